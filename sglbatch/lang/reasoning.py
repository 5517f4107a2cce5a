"""Reasoning separation (``sgl.separate_reasoning``): a generated text split into the model's
reasoning and its answer, by the reasoning tags of the model's family."""

from __future__ import annotations

# model_type -> (start tag, end tag, whether the output starts inside the reasoning)
_REASONING_FORMATS = {
    None: ("<think>", "</think>", False),
    "deepseek-r1": ("<think>", "</think>", True),
    "deepseek-v3": ("<think>", "</think>", False),
    "qwen3": ("<think>", "</think>", False),
    "qwen3-thinking": ("<think>", "</think>", True),
    "glm45": ("<think>", "</think>", False),
    "kimi": ("\u25c1think\u25b7", "\u25c1/think\u25b7", False),
    "step3": ("<think>", "</think>", True),
    "minimax": ("<think>", "</think>", True),
}


def split_reasoning(text: str, model_type: str | None) -> tuple[str, str]:
    """(reasoning, answer) of a generated text."""
    start, end, forced = _REASONING_FORMATS.get(model_type, _REASONING_FORMATS[None])
    body = text
    stripped = body.lstrip()
    in_reasoning = forced
    if stripped.startswith(start):
        body = stripped[len(start) :]
        in_reasoning = True
    if not in_reasoning:
        return "", text
    if end not in body:
        return body.strip(), ""
    reasoning, answer = body.split(end, 1)
    return reasoning.strip(), answer.lstrip()
