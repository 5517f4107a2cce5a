"""Engine and model configuration: frozen dataclasses, validated on construction."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EngineConfig:
    """Everything `Engine(**kwargs)` accepts. Field names follow SGLang's server args."""

    model_path: str = field(default=DEFAULT_MODEL, metadata={
        "help": "HF model directory, a .gguf file, or a built-in alias (smollm2-135m-instruct)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto | float32 | bfloat16 | float16; auto = bfloat16 where the CPU has native "
                "bf16 instructions, else float32"})
    device: str = field(default="auto", metadata={
        "help": "auto | cpu | cuda; auto = cuda where a CUDA GPU is visible, else cpu"})
    attention_backend: str = field(default="auto", metadata={
        "help": "auto | cpu | torch | triton | flashinfer. cpu: a C++ decode kernel compiled "
                "on first use (needs g++); torch: plain torch ops; triton: the kernels/ "
                "package (CUDA); flashinfer: flashinfer-python (CUDA). auto picks flashinfer "
                "on CUDA when installed, else triton, else torch; on the CPU, cpu when the "
                "kernel builds, else torch"})
    context_length: int | None = field(default=None, metadata={
        "help": "override the model's maximum context length"})
    max_total_tokens: int | None = field(default=None, metadata={
        "help": "KV pool size in tokens (default: what fits in kv_cache_gb)"})
    kv_cache_gb: float = field(default=2.0, metadata={
        "help": "memory budget for the KV pool when max_total_tokens is not given"})
    max_running_requests: int = field(default=256, metadata={
        "help": "most requests decoding at once"})
    chunked_prefill_size: int = field(default=2048, metadata={
        "help": "most new prompt tokens in one prefill step; longer prompts are chunked "
                "(-1 disables chunking)"})
    max_prefill_tokens: int = field(default=16384, metadata={
        "help": "most new prompt tokens in one prefill step when chunking is disabled"})
    disable_radix_cache: bool = field(default=False, metadata={
        "help": "turn off prefix caching (every prompt is computed in full)"})
    schedule_policy: str = field(default="lpm", metadata={
        "help": "waiting-queue order: lpm (longest cached prefix first) | fcfs | lof "
                "(longest output first) | random"})
    schedule_conservativeness: float = field(default=1.0, metadata={
        "help": "scales how many future decode tokens admission reserves; higher admits "
                "fewer requests but retracts less"})
    cuda_graph_max_bs: int = field(default=160, metadata={
        "help": "largest decode batch replayed from a captured CUDA graph (device cuda); "
                "larger batches run eagerly"})
    disable_cuda_graph: bool = field(default=False, metadata={
        "help": "run decode steps eagerly on CUDA instead of replaying CUDA graphs"})
    disable_overlap_schedule: bool = field(default=False, metadata={
        "help": "read each step's sampled tokens before scheduling the next. By default the "
                "next step is launched first (SGLang's overlap schedule), so on a GPU the "
                "scheduling and output processing run while the device computes. Steps with "
                "grammars, penalties, custom logit processors or logprobs, and tensor "
                "parallelism, always read first"})
    enable_torch_compile: bool = field(default=False, metadata={
        "help": "fuse RMSNorm and SwiGLU with torch.compile (inductor; compiles on first use)"})
    enable_custom_logit_processor: bool = field(default=False, metadata={
        "help": "accept custom logit processors sent with requests (this runs code the "
                "client sends; only enable it for trusted clients)"})
    tp_size: int = field(default=1, metadata={
        "help": "tensor parallel: split each layer across this many processes (NCCL on "
                "CUDA, gloo on the CPU); heads split in whole GQA groups"})
    dp_size: int = field(default=1, metadata={
        "help": "data parallel: this many engine replicas behind one front, requests routed "
                "by prefix-cache affinity, else to the least loaded"})
    load_balance_method: str = field(default="cache_aware", metadata={
        "help": "dp_size > 1: which replica takes a request: cache_aware (the longest "
                "prefix match while loads are balanced, else the least loaded), "
                "shortest_queue or random"})
    base_gpu_id: int = field(default=0, metadata={
        "help": "CUDA: the first GPU to use; replica r, rank t uses base_gpu_id + r * tp_size + t"})
    enable_deterministic_inference: bool = field(default=False, metadata={
        "help": "batch-invariant attention: greedy outputs do not depend on the other "
                "requests in the batch, on chunked prefill or on the prefix cache (slower; "
                "on the CPU the packed linear layers are batch-invariant already)"})
    speculative_algorithm: str | None = field(default=None, metadata={
        "help": "NGRAM: speculative decoding with each request's drafts looked up in its own "
                "tokens (the longest recent match of its last tokens, prompt and output), "
                "checked by the model in one pass; greedy requests only, and their outputs "
                "are the greedy ones. Pays off where decode steps are memory-bound (small "
                "batches) and outputs repeat their context"})
    speculative_num_draft_tokens: int = field(default=5, metadata={
        "help": "NGRAM: tokens each request verifies per step, its last sampled token "
                "included (as SGLang counts them): up to this many - 1 drafted"})
    speculative_ngram_max_match_window_size: int = field(default=4, metadata={
        "help": "NGRAM: the longest suffix of a request's tokens looked up for a draft "
                "(shorter ones are tried down to 1 token)"})
    speculative_max_batch_size: int = field(default=16, metadata={
        "help": "NGRAM: speculate only in decode steps of at most this many requests; in "
                "larger ones the linear layers are compute-bound and verifying drafts costs "
                "more than it saves"})
    random_seed: int = field(default=0, metadata={"help": "seed for requests without one"})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: torch's choice)"})

    def __post_init__(self) -> None:
        choices = {"dtype": ("auto", "float32", "bfloat16", "float16"),
                   "device": ("auto", "cpu", "cuda"),
                   "attention_backend": ("auto", "cpu", "torch", "triton", "flashinfer"),
                   "schedule_policy": ("lpm", "fcfs", "lof", "random"),
                   "load_balance_method": ("cache_aware", "shortest_queue", "random")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.device == "auto":  # frozen: resolved once, here, so every reader sees cpu|cuda
            object.__setattr__(self, "device", auto_device())
        if self.attention_backend == "cpu" and self.device != "cpu":
            raise ValueError("attention_backend='cpu' runs on device='cpu' only, "
                             f"got device={self.device!r}")
        if self.enable_deterministic_inference and self.attention_backend != "auto":
            raise ValueError("enable_deterministic_inference brings its own batch-invariant "
                             f"attention; leave attention_backend at auto, got "
                             f"{self.attention_backend!r}")
        if self.attention_backend == "flashinfer" and self.device != "cuda":
            raise ValueError("attention_backend='flashinfer' needs device='cuda', "
                             f"got device={self.device!r}")
        self._check_speculative()
        positive = ["max_running_requests", "max_prefill_tokens", "cuda_graph_max_bs",
                    "tp_size", "dp_size", "speculative_ngram_max_match_window_size",
                    "speculative_max_batch_size"]
        positive += [n for n in ("context_length", "max_total_tokens", "num_threads")
                     if getattr(self, n) is not None]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError(
                f"chunked_prefill_size must be > 0 or -1 (disabled), got {self.chunked_prefill_size}")
        if self.schedule_conservativeness <= 0:
            raise ValueError("schedule_conservativeness must be > 0, got "
                             f"{self.schedule_conservativeness}")
        if self.base_gpu_id < 0:
            raise ValueError(f"base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")

    def _check_speculative(self) -> None:
        if self.speculative_algorithm is None:
            return
        algorithm = self.speculative_algorithm.upper()  # SGLang spells it NGRAM
        if algorithm != "NGRAM":
            raise ValueError(f"speculative_algorithm={self.speculative_algorithm!r} is not "
                             "supported; use NGRAM (or leave it unset)")
        object.__setattr__(self, "speculative_algorithm", algorithm)
        if self.speculative_num_draft_tokens < 2:
            raise ValueError("speculative_num_draft_tokens must be >= 2 (the last sampled "
                             f"token and at least one draft), got "
                             f"{self.speculative_num_draft_tokens}")
        if self.enable_deterministic_inference:
            # Whether a request speculates depends on its batch's size, and a verify step
            # runs the extend kernels where a decode step runs the decode ones.
            raise ValueError("speculative_algorithm cannot be combined with "
                             "enable_deterministic_inference: drop one of them")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; valid: {sorted(known)}")
        return cls(**kwargs)

    @property
    def prefill_token_budget(self) -> int:
        return self.chunked_prefill_size if self.chunked_prefill_size > 0 else self.max_prefill_tokens

    def resolve_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.device == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@functools.cache
def auto_device() -> str:
    """What device="auto" means on this machine (SGLang's default is the GPU); logged once."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("device=auto: using %s%s", device,
                f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else
                " (no CUDA GPU visible)")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Hugging Face config.json that every family reads, plus the whole file
    (`hf`) for what only one family reads (Gemma's soft-caps, an MoE's expert counts).
    Which architectures run is the model registry's business (engine/models)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]
    hf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the model config: {e}") from e
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}: no \"architectures\" entry; sglbatch picks the model "
                             "class by it (e.g. [\"LlamaForCausalLM\"])")
        try:
            return cls._from_dict(cfg, archs[0], model_dir)
        except KeyError as e:
            raise ValueError(f"{path}: {archs[0]} config lacks the field {e}") from e

    @classmethod
    def _from_dict(cls, cfg: dict[str, Any], arch: str, model_dir: Path) -> ModelConfig:
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg, rope),
            rope_scaling=rope if rope and _rope_type(rope) != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            eos_token_ids=_eos_ids(model_dir, cfg),
            hf=cfg,
        )


def _rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def _rope_theta(cfg: dict[str, Any], rope: dict[str, Any] | None) -> float:
    # transformers 5 moved rope_theta into rope_parameters; older configs keep it top-level.
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    if rope and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return 10000.0


def _eos_ids(model_dir: Path, cfg: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (chat models often add one there)."""
    ids: list[int] = []
    sources = [cfg]
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.exists():
        sources.append(json.loads(gen_path.read_text()))
    for source in sources:
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)
