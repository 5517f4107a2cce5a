"""A GGUF file in llama.cpp's layout -> a Hugging Face model directory (config.json, float32
model.safetensors, tokenizer and generation_config.json).

Per family (GGUF `general.architecture`) this undoes what llama.cpp's convert_hf_to_gguf did:
llama's q/k row permutation, Gemma's `1 + w` norm weights, Llama-3.1's rope scaling folded into
a `rope_freqs` tensor, the tensor names (`ffn_norm` is Llama's post-attention norm but Gemma's
pre-feedforward norm), and the hyper-parameters llama.cpp leaves out of the metadata because its
loader hard-codes them (Gemma's sliding-window layer pattern, attention scale, local RoPE base).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_COMMON_BLOCKS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMA_BLOCKS = {**_COMMON_BLOCKS, "ffn_norm": "post_attention_layernorm"}
_GEMMA_BLOCKS = {**_COMMON_BLOCKS, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps onto a Hugging Face model class."""

    hf_arch: str
    model_type: str
    blocks: dict[str, str]  # GGUF per-block tensor name -> HF module path inside the layer
    permuted_qk: bool = False  # llama.cpp interleaved the q/k rows (llama-style archs only)
    norm_shift: float = 0.0  # llama.cpp stored Gemma's RMSNorm weights as 1 + w


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "llama", _LLAMA_BLOCKS, permuted_qk=True),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", _LLAMA_BLOCKS),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", {**_LLAMA_BLOCKS, **_QK_NORMS}),
    "gemma2": Family("Gemma2ForCausalLM", "gemma2", _GEMMA_BLOCKS, norm_shift=1.0),
    "gemma3": Family("Gemma3ForCausalLM", "gemma3_text", {**_GEMMA_BLOCKS, **_QK_NORMS},
                     norm_shift=1.0),
}


class _Meta:
    """The GGUF metadata of one file; `get` reads `<arch>.<key>`, `raw` a full key."""

    def __init__(self, reader: Any, path: Path):
        self.reader, self.path = reader, path
        self.arch = self.raw("general.architecture")
        self.tensors = {t.name: t for t in reader.tensors}

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        return self.raw(f"{self.arch}.{key}", default)


def open_gguf(path: Path) -> Any:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways (bad magic, short reads, reshapes)
        raise ValueError(f"{path} is not a valid GGUF file (corrupt or truncated?); expected a "
                         "Hugging Face model directory or a .gguf file: "
                         f"{type(e).__name__}: {e}") from e
    arch = _Meta(reader, path).arch
    if arch not in FAMILIES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(FAMILIES)}")
    return reader


def convert(reader: Any, gguf_path: Path, dest: Path) -> None:
    """Write the HF model directory for `reader` (opened from `gguf_path`) into `dest`."""
    meta = _Meta(reader, gguf_path)
    config = hf_config(meta)
    _write_weights(meta, config, dest / "model.safetensors")
    _write_tokenizer(meta, dest)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_config(path: Path) -> dict[str, Any]:
    """The config.json a conversion of the GGUF at `path` would write (weights untouched)."""
    return hf_config(_Meta(open_gguf(path), path))


# --- config.json ------------------------------------------------------------------------------


def hf_config(meta: _Meta) -> dict[str, Any]:
    family = FAMILIES[meta.arch]
    hidden, heads = meta.get("embedding_length"), meta.get("attention.head_count")
    head_dim = meta.get("attention.key_length", hidden // heads)
    rope_dim = meta.get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{meta.path}: partial rotary embeddings (rope.dimension_count "
                         f"{rope_dim} of head_dim {head_dim}) are not supported")
    embed = meta.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{meta.path}: GGUF has no token_embd.weight tensor")
    config = {
        "architectures": [family.hf_arch], "model_type": family.model_type,
        "hidden_size": hidden, "intermediate_size": meta.get("feed_forward_length"),
        "num_hidden_layers": meta.get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta.get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta.get("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": meta.get("context_length"),
        "vocab_size": int(embed.shape[-1]),  # gguf shapes are reversed: [hidden, vocab]
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
        "torch_dtype": "float32",
    }
    if family.model_type.startswith("gemma"):
        config.update(_gemma_config(meta, config))
    else:
        theta = float(meta.get("rope.freq_base", 10000.0))
        scaling = _rope_scaling(meta)
        if ROPE_FREQS in meta.tensors:
            if meta.arch != "llama" or scaling:
                raise ValueError(f"{meta.path}: GGUF tensor {ROPE_FREQS!r} is only understood "
                                 "as Llama-3 rope scaling (architecture llama, no other "
                                 "rope.scaling)")
            scaling = llama3_rope_scaling(meta, theta, head_dim)
        config["rope_theta"] = theta  # top-level too, for readers that predate transformers 5
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **scaling}
    for gguf_key, key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        token = meta.raw(f"tokenizer.ggml.{gguf_key}_token_id", None)
        if token is not None:
            config[f"{key}_token_id"] = token
    return config


def _rope_scaling(meta: _Meta) -> dict[str, Any]:
    kind = meta.get("rope.scaling.type", None)
    if kind in (None, "none"):
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.get("rope.scaling.factor"))}
    if kind == "yarn":
        ctx = meta.get("rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(meta.get("rope.scaling.factor")),
                "original_max_position_embeddings": ctx}
    raise ValueError(f"{meta.path}: GGUF rope scaling type {kind!r} is not supported "
                     "(none, linear, yarn)")


def _gemma_config(meta: _Meta, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2/3 fields, as llama.cpp's loader reads (or hard-codes) them."""
    layers, gemma3 = config["num_hidden_layers"], meta.arch == "gemma3"
    # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B models (46 layers for
    # Gemma 2, 62 for Gemma 3) and by 1/sqrt(head_dim) for every other size.
    big = layers == (62 if gemma3 else 46)
    scalar = config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]
    # Gemma 2 alternates sliding/global from layer 0; Gemma 3 has 5 sliding layers per global.
    period = 6 if gemma3 else 2
    window = meta.get("attention.sliding_window", None if gemma3 else 4096)
    swa = bool(window)
    layer_types = ["sliding_attention" if swa and i % period < period - 1 else "full_attention"
                   for i in range(layers)]
    theta = float(meta.get("rope.freq_base", 10000.0))
    scaling = _rope_scaling(meta)
    if ROPE_FREQS in meta.tensors:
        raise ValueError(f"{meta.path}: GGUF tensor {ROPE_FREQS!r} has no Hugging Face "
                         f"equivalent for {meta.arch}")
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
        "sliding_window": window if swa else None, "layer_types": layer_types,
        "rope_theta": theta,
    }
    if gemma3:  # the global layers use rope.freq_base (and any scaling); local ones 10000
        out["rope_local_base_freq"] = 10000.0
        out["rope_scaling"] = scaling or None
        out["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": theta, **scaling},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        out["final_logit_softcapping"] = out["attn_logit_softcapping"] = None
        return out
    swa_theta = float(meta.get("rope.freq_base_swa", theta))
    if swa_theta != theta:
        raise ValueError(f"{meta.path}: Gemma 2 with a separate sliding-window RoPE base "
                         f"({swa_theta} vs {theta}) has no Hugging Face equivalent")
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **scaling}
    out["attn_logit_softcapping"] = float(meta.get("attn_logit_softcapping", 50.0))
    out["final_logit_softcapping"] = float(meta.get("final_logit_softcapping", 30.0))
    return out


# --- Llama-3.1 rope scaling, recovered from rope_freqs ----------------------------------------


def llama3_factors(params: dict[str, Any], inv_freq: np.ndarray) -> np.ndarray:
    """What HF's llama3 rope scaling divides each inverse frequency by (llama.cpp's
    rope_freqs values): 1 for short wavelengths, `factor` for long ones, smooth between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    ctx = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (ctx / wavelen - low) / (high - low) if high != low else np.zeros_like(inv_freq)
    with np.errstate(divide="ignore", invalid="ignore"):  # only where np.where discards it
        out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen > ctx / low, factor, out)
    return np.where(wavelen < ctx / high, 1.0, out)


def llama3_rope_scaling(meta: _Meta, theta: float, head_dim: int) -> dict[str, Any]:
    """The llama3 `rope_parameters` whose frequencies are the GGUF's rope_freqs tensor.

    llama.cpp writes no metadata for this scaling, only the tensor: computed from the HF
    config's factor and low/high_freq_factor (1 and 4 for every Llama 3.x) with an original
    context of 8192. We try 1 and 4, then fit the two to the tensor, and keep only a set whose
    factors reproduce the tensor; anything else is refused rather than run with wrong positions.
    """
    factors = _load(meta, meta.tensors[ROPE_FREQS]).reshape(-1).astype(np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    where = f"{meta.path}: GGUF tensor {ROPE_FREQS!r} (Llama-3 rope scaling factors)"
    if factors.shape != inv_freq.shape:
        raise ValueError(f"{where} has {factors.size} values; expected head_dim/2 = "
                         f"{inv_freq.size}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        logger.info("%s: all rope_freqs are 1 (no scaling)", meta.path.name)
        return {}
    ctx = int(meta.get("rope.scaling.original_context_length", 8192))
    base = {"rope_type": "llama3", "factor": float(factors.max()),
            "original_max_position_embeddings": ctx}
    candidates = [{**base, "low_freq_factor": 1.0, "high_freq_factor": 4.0}]
    fitted = _fit_llama3(factors, ctx * inv_freq / (2 * math.pi), base["factor"])
    if fitted is not None:
        rounded = tuple(float(f"{v:.6g}") for v in fitted)
        candidates += [{**base, "low_freq_factor": lo, "high_freq_factor": hi}
                       for lo, hi in (rounded, fitted)]
    for params in candidates:
        if 0 < params["low_freq_factor"] < params["high_freq_factor"] and np.allclose(
                llama3_factors(params, inv_freq), factors, rtol=1e-5, atol=1e-6):
            logger.info("%s: rope_freqs -> rope scaling %s", meta.path.name, params)
            return params
    raise ValueError(f"{where} matches no llama3 rope scaling (factor {base['factor']}, "
                     f"original context {ctx}); refusing to run with a different RoPE. "
                     f"Values: {np.round(factors, 4).tolist()}")


def _fit_llama3(factors: np.ndarray, x: np.ndarray, factor: float
                ) -> tuple[float, float] | None:
    """(low_freq_factor, high_freq_factor) in the units of x = original_ctx / wavelength.

    Frequencies with factor 1 lie above high_freq_factor, those with `factor` below
    low_freq_factor, and each one between gives s = (x - low) / (high - low)."""
    if factor <= 1:
        return None
    keep = np.isclose(factors, 1.0, rtol=0, atol=1e-6)
    scaled = np.isclose(factors, factor, rtol=1e-6, atol=0)
    mid = ~(keep | scaled)
    s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    lo = float(x[scaled].max()) if scaled.any() else 0.0
    hi = float(x[keep].min()) if keep.any() else 2 * float(x.max()) + 1
    if mid.sum() >= 2:
        slope, icpt = np.polyfit(x[mid], s, 1)
        return (-icpt / slope, (1 - icpt) / slope) if slope > 0 else None
    if mid.sum() == 1:  # one point pins the line only up to its width: any fitting one will do
        x0, s0 = float(x[mid][0]), float(s[0])
        width = 0.5 * min((x0 - lo) / s0, (hi - x0) / (1 - s0))
        return x0 - s0 * width, x0 + (1 - s0) * width
    return lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3


# --- weights ----------------------------------------------------------------------------------


def hf_name(family: Family, name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m[2] in family.blocks:
        return f"model.layers.{m[1]}.{family.blocks[m[2]]}.{m[3]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate_half halves).

    Within each head llama.cpp stores HF row s*half + i at row 2*i + s.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load(meta: _Meta, tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    except NotImplementedError as e:
        raise ValueError(f"{meta.path}: tensor {tensor.name}: {e}") from e


def _write_weights(meta: _Meta, config: dict[str, Any], dest: Path) -> None:
    family = FAMILIES[meta.arch]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    items = []
    for tensor in meta.reader.tensors:
        if tensor.name == ROPE_FREQS:  # hf_config turned it into rope_parameters (or refused)
            continue
        name = hf_name(family, tensor.name)
        if name is None:
            raise ValueError(f"{meta.path}: GGUF tensor {tensor.name!r} has no Hugging Face "
                             f"equivalent in this converter ({meta.arch})")
        items.append((name, tuple(int(d) for d in reversed(tensor.shape)), tensor))

    def load(tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
        w = _load(meta, tensor).reshape(shape)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if family.permuted_qk and kind in heads:
            w = unpermute_qk(w, heads[kind])
        if family.norm_shift and tensor.name.endswith("norm.weight"):
            w = w - np.float32(family.norm_shift)
        return w

    logger.info("converting %d GGUF tensors of %s to float32", len(items), meta.path.name)
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


# --- tokenizer --------------------------------------------------------------------------------


def _write_tokenizer(meta: _Meta, dest: Path) -> None:
    from transformers import AutoTokenizer  # heavy import, only needed when converting

    path = meta.path
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = meta.raw("tokenizer.chat_template", None)
    if template and not tok.chat_template:  # transformers 5.x carries it over; older may not
        tok.chat_template = template
    tok.save_pretrained(str(dest))
    gen = {"bos_token_id": meta.raw("tokenizer.ggml.bos_token_id", None)}
    # llama.cpp stops on every end-of-generation token (eos, eot, eom); so should we.
    eog = [meta.raw(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    eog = list(dict.fromkeys(t for t in eog if t is not None))
    gen["eos_token_id"] = eog[0] if len(eog) == 1 else eog or None
    (dest / "generation_config.json").write_text(
        json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2) + "\n")
