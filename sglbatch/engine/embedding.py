"""Sentence embeddings from a sentence-transformers BERT directory (e.g. all-MiniLM-L6-v2).

The model is BERT written out here in torch (embeddings, post-LayerNorm encoder layers),
followed by the directory's pooling (modules.json / 1_Pooling/config.json) and, when the
directory lists a Normalize module, L2 normalization, as sentence-transformers computes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
_MODULE_TYPES = ("Transformer", "Pooling", "Normalize")
_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
# Checkpoint tensors a sentence embedding does not use.
_UNUSED = ("pooler.", "cls.", "embeddings.position_ids")

Inputs = Sequence[str] | Sequence[Sequence[int]]


class _Layer(nn.Module):
    """One BERT encoder layer: self-attention and feed-forward, each add-then-LayerNorm."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.heads = cfg["num_attention_heads"]
        self.qkv = nn.Linear(hidden, 3 * hidden)  # checkpoint's query/key/value, fused
        self.o = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, cfg["intermediate_size"])
        self.down = nn.Linear(cfg["intermediate_size"], hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.act = _ACTIVATIONS[cfg.get("hidden_act", "gelu")]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, hidden = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.ln1(x + self.o(attn.transpose(1, 2).reshape(b, n, hidden)))
        return self.ln2(x + self.down(self.act(self.up(x))))


class _Bert(nn.Module):
    """BertModel's encoder without the pooler: token ids -> last hidden states."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word = nn.Embedding(cfg["vocab_size"], hidden)
        self.position = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type = nn.Embedding(cfg.get("type_vocab_size", 2), hidden)
        self.ln = nn.LayerNorm(hidden, eps=cfg.get("layer_norm_eps", 1e-12))
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.word(ids) + self.position(positions) + self.token_type.weight[0])
        mask = keep[:, None, None, :]  # [batch, 1, 1, keys]: padding is never attended to
        for layer in self.layers:
            x = layer(x, mask)
        return x


_LAYER_NAMES = {
    "attention.output.dense": "o", "attention.output.LayerNorm": "ln1",
    "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "ln2",
}
_GLOBAL_NAMES = {
    "embeddings.word_embeddings": "word", "embeddings.position_embeddings": "position",
    "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "ln",
}


def _our_name(name: str) -> str | None:
    """Our parameter name for a Hugging Face BERT checkpoint tensor (None: not used)."""
    for prefix in ("bert.", "model."):
        name = name.removeprefix(prefix)
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # pre-2019 checkpoints
    if name.startswith(_UNUSED):
        return None
    module, _, leaf = name.rpartition(".")
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{leaf}"
    parts = module.split(".")
    if parts[:2] == ["encoder", "layer"] and len(parts) > 2:
        sub = ".".join(parts[3:])
        if sub in ("attention.self.query", "attention.self.key", "attention.self.value"):
            return f"layers.{parts[2]}.qkv.{leaf}:{sub.rpartition('.')[2]}"
        if sub in _LAYER_NAMES:
            return f"layers.{parts[2]}.{_LAYER_NAMES[sub]}.{leaf}"
    return None


def _read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    bin_file = model_dir / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(f"{model_dir}: no model weights (*.safetensors or pytorch_model.bin)")


def _load_weights(model: _Bert, model_dir: Path) -> None:
    params = dict(model.named_parameters())
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    loaded = set()
    for name, tensor in _read_checkpoint(model_dir).items():
        ours = _our_name(name)
        if ours is None:
            continue
        if ":" in ours:  # query/key/value: fused into one qkv parameter once all three are in
            ours, part = ours.split(":")
            qkv.setdefault(ours, {})[part] = tensor
            if len(qkv[ours]) < 3:
                continue
            tensor = torch.cat([qkv[ours][p] for p in ("query", "key", "value")])
        if params[ours].shape != tensor.shape:
            raise ValueError(f"{model_dir}: checkpoint tensor {name} has shape "
                             f"{tuple(tensor.shape)}, the config implies {tuple(params[ours].shape)}")
        params[ours].data.copy_(tensor)
        loaded.add(ours)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks BERT weights: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON: {e}") from e


class EmbeddingModel:
    """A sentence-transformers BERT model: `encode` turns texts (or token ids) into vectors.

    `model_path` is a sentence-transformers directory (config.json, model.safetensors or
    pytorch_model.bin, tokenizer files, optionally modules.json, 1_Pooling/config.json and
    sentence_bert_config.json), or a built-in alias such as "all-minilm-l6-v2". Without
    modules.json the pooling is the mean over tokens and vectors are not normalized.
    """

    def __init__(self, model_path: str, dtype: str | torch.dtype = "float32") -> None:
        from transformers import AutoTokenizer

        self.model_name = str(model_path)
        model_dir = Path(model_path).expanduser()
        if not model_dir.is_dir():
            from sglbatch.engine.model_source import MODEL_ALIASES, resolve_model_path

            if str(model_path).strip().lower() not in MODEL_ALIASES:  # a file is no BERT dir
                raise FileNotFoundError(
                    f"embedding model {str(model_path)!r} is no directory; give a "
                    "sentence-transformers model directory or a built-in alias such as "
                    "all-minilm-l6-v2")
            model_dir = resolve_model_path(str(model_path))
        self.model_dir = model_dir
        cfg = _read_json(model_dir / "config.json")
        if cfg.get("model_type") != "bert":
            raise ValueError(f"{model_dir}: model_type {cfg.get('model_type')!r} is not "
                             "supported for embeddings (only BERT sentence-transformers models)")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{model_dir}: position_embedding_type "
                             f"{cfg['position_embedding_type']!r} is not supported (absolute)")
        if cfg.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"{model_dir}: hidden_act {cfg['hidden_act']!r} is not supported; "
                             f"supported: {', '.join(_ACTIVATIONS)}")
        self.dim: int = cfg["hidden_size"]
        self.pooling, self.normalize = self._read_modules(model_dir)
        st_cfg_path = model_dir / "sentence_bert_config.json"
        st_cfg = _read_json(st_cfg_path) if st_cfg_path.is_file() else {}
        self._lower_case = bool(st_cfg.get("do_lower_case", False))

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        limit = cfg["max_position_embeddings"]
        if st_cfg.get("max_seq_length"):
            limit = min(limit, int(st_cfg["max_seq_length"]))
        elif self.tokenizer.model_max_length:
            limit = min(limit, int(self.tokenizer.model_max_length))
        self.max_seq_length: int = limit
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._vocab_size = cfg["vocab_size"]

        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype {dtype!r} is not supported; choose from "
                                 f"{', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        self.dtype = dtype
        with torch.device("meta"):  # no throwaway random init; the checkpoint fills it
            model = _Bert(cfg)
        model = model.to_empty(device="cpu")
        _load_weights(model, model_dir)
        self.model = model.to(dtype).eval().requires_grad_(False)

    @staticmethod
    def _read_modules(model_dir: Path) -> tuple[str, bool]:
        """(pooling mode, whether to L2-normalize) from modules.json and the pooling config."""
        modules_path = model_dir / "modules.json"
        if not modules_path.is_file():
            return "mean_tokens", False  # what sentence-transformers does for a plain BERT
        pooling, normalize = None, False
        for module in _read_json(modules_path):
            kind = module.get("type", "").rpartition(".")[2]
            if kind not in _MODULE_TYPES:
                raise ValueError(f"{modules_path}: module {module.get('type')!r} is not supported "
                                 f"(supported: {', '.join(_MODULE_TYPES)})")
            normalize |= kind == "Normalize"
            if kind == "Pooling":
                pool_cfg = _read_json(model_dir / module.get("path", "") / "config.json")
                on = [m for m in _POOLING_MODES if pool_cfg.get(f"pooling_mode_{m}")]
                other = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v
                         and k.removeprefix("pooling_mode_") not in _POOLING_MODES]
                if len(on) != 1 or other:
                    raise ValueError(f"{model_dir / module.get('path', '')}: pooling must be "
                                     f"exactly one of {', '.join(_POOLING_MODES)}; got "
                                     f"{', '.join(on + other) or 'none'}")
                pooling = on[0]
        return pooling or "mean_tokens", normalize

    def tokenize(self, inputs: Inputs, truncate: bool = True) -> list[list[int]]:
        """Token ids the model reads for each input ([CLS] ... [SEP] for texts).

        Token-id inputs are taken as they are (no special tokens added). Inputs longer than
        max_seq_length are cut to it, or, with truncate=False, refused with a ValueError.
        """
        if isinstance(inputs, str) or not isinstance(inputs, Sequence):
            raise TypeError("inputs must be a list of strings or a list of token-id lists")
        texts = [(i, t) for i, t in enumerate(inputs) if isinstance(t, str)]
        ids: list[list[int] | None] = [None] * len(inputs)
        if texts:
            tokenized = self.tokenizer(
                [t.lower() if self._lower_case else t for _, t in texts],
                truncation=truncate, max_length=self.max_seq_length if truncate else None,
                verbose=False)["input_ids"]
            for (i, _), tok in zip(texts, tokenized):
                ids[i] = tok
        for i, item in enumerate(inputs):
            if ids[i] is None:
                ids[i] = self._check_ids(i, item)[: self.max_seq_length if truncate else None]
            if len(ids[i]) > self.max_seq_length:
                raise ValueError(f"input[{i}] is {len(ids[i])} tokens long, more than this "
                                 f"model's maximum of {self.max_seq_length} tokens")
        return ids

    def _check_ids(self, i: int, item: Any) -> list[int]:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
            raise TypeError(f"input[{i}] must be a string or a list of token ids, "
                            f"not {type(item).__name__}")
        if not item:
            raise ValueError(f"input[{i}] is an empty list of token ids")
        bad = [t for t in item if not isinstance(t, int) or isinstance(t, bool)
               or not 0 <= t < self._vocab_size]
        if bad:
            raise ValueError(f"input[{i}] has token id {bad[0]!r} outside this model's "
                             f"vocabulary [0, {self._vocab_size})")
        return list(item)

    def count_tokens(self, inputs: Inputs, truncate: bool = True) -> list[int]:
        """How many tokens the model reads for each input (for usage accounting)."""
        return [len(ids) for ids in self.tokenize(inputs, truncate)]

    def encode(self, inputs: Inputs, truncate: bool = True,
               batch_size: int = 32) -> list[list[float]]:
        """One `dim`-long vector per input, in input order (see `tokenize` for the inputs)."""
        ids = self.tokenize(inputs, truncate)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batch like-length inputs
        out: list[list[float]] = [[] for _ in ids]
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for i, vec in zip(chunk, self._embed([ids[i] for i in chunk]).tolist()):
                    out[i] = vec
        return out

    def _embed(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in batch)
        device = self.model.word.weight.device
        ids = torch.tensor([seq + [self._pad_id] * (width - len(seq)) for seq in batch],
                           dtype=torch.long, device=device)
        keep = torch.tensor([[True] * len(seq) + [False] * (width - len(seq)) for seq in batch],
                            device=device)
        hidden = self.model(ids, keep).float()
        if self.pooling == "cls_token":
            vecs = hidden[:, 0]
        elif self.pooling == "max_tokens":
            vecs = hidden.masked_fill(~keep[..., None], -math.inf).amax(dim=1)
        else:
            counts = keep.sum(dim=1, keepdim=True).float()
            vecs = (hidden * keep[..., None]).sum(dim=1)
            vecs = vecs / (counts if self.pooling == "mean_tokens" else counts.sqrt())
        return F.normalize(vecs, p=2, dim=1) if self.normalize else vecs
