"""Checks that a family's engine model matches transformers', on a tiny random checkpoint.

    tiny = build_tiny(lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(...)), tmp_dir, tokenizer_dir)
    check_logits(tiny)                              # last-position logits within 1e-4
    check_greedy(tiny)                              # greedy tokens, ragged batch + cached prefix
    check_greedy(tiny, chunked_prefill_size=16)     # the same, prompts chunked
    check_greedy(tiny, tp_size=2)                   # the same over two gloo ranks

or all of them at once with `check_matches_transformers`. A family's test module gets the
first three as tests by subclassing `MatchesTransformers` (and the tp run with
`MatchesOverTwoRanks`) and giving a `tiny` fixture. Everything runs in fp32 on the CPU
with the torch attention backend (the oracle). Prompts are longer than a 16-32 token sliding
window so windowed layers are tested past it; the second greedy batch shares a 40-token
prefix, so it is served from the radix cache and decodes through the shared-prefix (cascade)
path; every engine step runs under `DeviceCheck`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.device_follow import DeviceCheck, assert_all_named, checked
from tests.engine.conftest import assert_pool_whole

NEW_TOKENS = 32
PROMPT_LENS = (5, 23, 41, 70)
SHARED_PREFIX_LEN = 40
SUFFIX_LENS = (3, 9, 17)


@dataclass
class Tiny:
    """A random transformers model, its checkpoint on disk and the prompts to compare on."""

    hf: nn.Module
    path: Path
    prompts: list[list[int]]  # ragged, one batch
    shared_prompts: list[list[int]]  # a common prefix (cached by the first batch's last prompt)
    engine_args: dict = field(default_factory=dict)  # every engine of the checks gets these
    _hf_greedy: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def hf_greedy(self, prompt: list[int]) -> list[int]:
        """transformers `generate`, greedy, NEW_TOKENS tokens whatever they are (no EOS stop
        and no EOS masking: the engine's `ignore_eos`)."""
        key = tuple(prompt)
        if key not in self._hf_greedy:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.hf.generate(ids, attention_mask=torch.ones_like(ids),
                                       do_sample=False, max_new_tokens=NEW_TOKENS,
                                       pad_token_id=0)
            self._hf_greedy[key] = out[0, len(prompt):].tolist()
        return self._hf_greedy[key]


def build_tiny(hf_model_factory: Callable[[], nn.Module], path: Path, tokenizer_dir: Path,
               seed: int = 0, prompt_lens: tuple[int, ...] = PROMPT_LENS,
               engine_args: dict | None = None) -> Tiny:
    """`hf_model_factory()` (a transformers model built from its config) with every parameter
    random, norms and biases included (a dropped bias or a norm's weight read wrongly cannot
    pass), saved to `path` with a tokenizer (any: the tests send token ids). The last of
    `prompt_lens` must exceed SHARED_PREFIX_LEN: its start is the shared prefix."""
    torch.manual_seed(seed)
    hf = hf_model_factory().float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.generation_config.eos_token_id = None  # `hf_greedy` never stops early
    hf.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, path / name)
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = hf.config.get_text_config().vocab_size

    def randoms(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    prompts = [randoms(n) for n in prompt_lens]
    prefix = prompts[-1][:SHARED_PREFIX_LEN]
    return Tiny(hf, Path(path), prompts, [prefix + randoms(n) for n in SUFFIX_LENS],
                engine_args or {})


def _engine(tiny: Tiny, **engine_args):
    from sglbatch.engine.engine import Engine

    args = {"dtype": "float32", "attention_backend": "torch", "max_total_tokens": 2048,
            **tiny.engine_args, **engine_args}
    return Engine(model_path=str(tiny.path), **args)


def engine_greedy(tiny: Tiny, **engine_args) -> tuple[list[list[int]], list[list[int]]]:
    """The engine's greedy tokens for `tiny.prompts` (one batch), then for
    `tiny.shared_prompts` (a second batch, its prefix cached by the first)."""
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    check = DeviceCheck()
    with _engine(tiny, **engine_args) as eng:
        runner = eng.model_runner
        runner.launch = checked(runner.launch, check)
        first = eng.generate(input_ids=tiny.prompts, sampling_params=params)
        second = eng.generate(input_ids=tiny.shared_prompts, sampling_params=params)
        if eng.scheduler.cache is not None:
            cached = [o["meta_info"]["cached_tokens"] for o in second]
            assert min(cached) >= SHARED_PREFIX_LEN - 1, cached
        assert_pool_whole(eng)
    assert_all_named(check)
    return [o["output_ids"] for o in first], [o["output_ids"] for o in second]


def check_greedy(tiny: Tiny, **engine_args) -> None:
    first, second = engine_greedy(tiny, **engine_args)
    for prompts, ours in ((tiny.prompts, first), (tiny.shared_prompts, second)):
        for prompt, out in zip(prompts, ours):
            assert out == tiny.hf_greedy(prompt), f"prompt of {len(prompt)} tokens"


def last_logits(tiny: Tiny, prompts: list[list[int]], **engine_args) -> torch.Tensor:
    """The engine's logits [len(prompts), vocab] at each prompt's last token, one prefill."""
    from sglbatch.engine.batch import Batch, ForwardMode
    from sglbatch.engine.config import EngineConfig
    from sglbatch.engine.model_runner import ModelRunner
    from sglbatch.engine.request import Req
    from sglbatch.engine.sampling_params import SamplingParams

    args = {"dtype": "float32", "attention_backend": "torch", "max_total_tokens": 1024,
            "max_running_requests": len(prompts), **tiny.engine_args, **engine_args}
    config = EngineConfig(model_path=str(tiny.path), **args)
    runner = ModelRunner(config, tiny.path)
    reqs = []
    slots = runner.kv_pool.alloc(sum(map(len, prompts)))
    start = 0
    for i, ids in enumerate(prompts):
        req = Req(f"r{i}", ids, SamplingParams(temperature=0))
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        runner.req_to_token_pool.table[req.req_pool_idx, :len(ids)] = \
            slots[start:start + len(ids)]
        start += len(ids)
        reqs.append(req)
    return runner.forward(Batch(ForwardMode.EXTEND, reqs, list(map(len, prompts)), slots))


def check_logits(tiny: Tiny, tolerance: float = 1e-4, **engine_args) -> None:
    ours = last_logits(tiny, tiny.prompts, **engine_args)
    for prompt, row in zip(tiny.prompts, ours):
        with torch.no_grad():
            ref = tiny.hf(torch.tensor([prompt])).logits[0, -1]
        diff = (row - ref).abs().max().item()
        assert diff < tolerance, f"prompt of {len(prompt)} tokens: max abs diff {diff}"


def check_matches_transformers(hf_model_factory: Callable[[], nn.Module], path: Path,
                               tokenizer_dir: Path, tp_size: int = 1, **engine_args) -> None:
    """Every check above on one tiny model (`tp_size` > 1 adds a tensor-parallel run), each
    engine given `engine_args` too (e.g. a context_length)."""
    tiny = build_tiny(hf_model_factory, path, tokenizer_dir)
    check_logits(tiny, **engine_args)
    check_greedy(tiny, **engine_args)
    check_greedy(tiny, chunked_prefill_size=16, **engine_args)
    if tp_size > 1:
        check_greedy(tiny, tp_size=tp_size, **engine_args)


def tiny_fixture(hf_model_factory: Callable[[], nn.Module]) -> Callable:
    """A module-scoped `tiny` fixture over one model (`tiny = tiny_fixture(factory)`)."""

    @pytest.fixture(scope="module")
    def tiny(tmp_path_factory, smollm2_dir) -> Tiny:
        return build_tiny(hf_model_factory, tmp_path_factory.mktemp("tiny"), smollm2_dir)

    return tiny


class MatchesTransformers:
    """The checks every family passes, as tests of a subclass whose module has a `tiny`."""

    def test_last_logits_match_transformers(self, tiny: Tiny) -> None:
        check_logits(tiny)

    def test_greedy_matches_transformers(self, tiny: Tiny) -> None:
        check_greedy(tiny)

    def test_greedy_with_chunked_prefill_matches_transformers(self, tiny: Tiny) -> None:
        check_greedy(tiny, chunked_prefill_size=16)


class MatchesOverTwoRanks(MatchesTransformers):
    """The same, plus greedy tokens over two tensor-parallel (gloo) ranks."""

    def test_greedy_over_two_ranks_matches_transformers(self, tiny: Tiny) -> None:
        check_greedy(tiny, tp_size=2, chunked_prefill_size=16)
