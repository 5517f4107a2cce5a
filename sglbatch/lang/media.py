"""Images and videos in programs: finding them in an expression (so a text-only backend
refuses them when they are added) and image inputs as base64."""

from __future__ import annotations

import base64
import os

from sglbatch.lang.ir import SglExpr, SglExprList, SglImage, SglVideo


def find_media(expr) -> SglExpr | None:
    """The first image or video in an expression, or None."""
    if isinstance(expr, (SglImage, SglVideo)):
        return expr
    if isinstance(expr, SglExprList):
        for x in expr.expr_list:
            found = find_media(x)
            if found is not None:
                return found
    return None


def encode_image_base64(image) -> str:
    """Base64 of an image given as a path, bytes, a data URL or a base64 string."""
    if isinstance(image, bytes):
        return base64.b64encode(image).decode()
    if not isinstance(image, str):
        # A PIL image.
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    if image.startswith("data:"):
        return image.split(",", 1)[1]
    if image.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(image, timeout=30) as resp:
            return base64.b64encode(resp.read()).decode()
    if os.path.exists(image):
        with open(image, "rb") as fh:
            return base64.b64encode(fh.read()).decode()
    # Assume it already is base64.
    return image
