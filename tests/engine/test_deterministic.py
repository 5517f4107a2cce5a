"""enable_deterministic_inference: greedy outputs in bf16 do not depend on which requests
share the batch, on their order, on chunked prefill or on a warm prefix cache; and its
batch-invariant attention is still right (tiny random Gemma 2 with a sliding window and
soft-caps matches transformers); and each batch-invariant attention gives a row the same bits
in one pass, in chunks, or alone as a decode row."""

from __future__ import annotations

import random

import pytest
import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.base import LayerAttention
from sglbatch.engine.attention.deterministic import CpuDeterministicBackend, DeterministicBackend
from sglbatch.engine.batch import ForwardMode
from tests.engine.models.test_gemma import _gemma2
from tests.engine.models.tiny_check import build_tiny, check_greedy, check_logits
from tests.engine.test_attention_cpu_extend import _inputs, _pool
from tests.engine.test_attention_torch import _forward_batch
from tests.kernels.ragged import forward_reference, ragged_batch, tolerance

PARAMS = {"temperature": 0, "max_new_tokens": 16}
SYSTEM = "You are a careful assistant. Answer in one short sentence, with one fact. "
PROMPTS = [SYSTEM + f"Question {i}: what is the capital of country number {i}, and why is "
           f"{i * 7} interesting?" for i in range(32)]


def _ids(outputs):
    return [o["output_ids"] for o in outputs]


def test_greedy_tokens_do_not_depend_on_the_batch(smollm2_dir):
    from sglbatch.engine.engine import Engine

    args = dict(model_path=str(smollm2_dir), dtype="bfloat16", kv_cache_gb=0.25,
                enable_deterministic_inference=True)
    with Engine(**args) as engine:
        together = _ids(engine.generate(PROMPTS, PARAMS))
        alone = [engine.generate(p, PARAMS)["output_ids"] for p in PROMPTS[:8]]
        order = list(range(len(PROMPTS)))
        random.Random(0).shuffle(order)
        shuffled = _ids(engine.generate([PROMPTS[i] for i in order], PARAMS))
        warm = _ids(engine.generate(PROMPTS, PARAMS))  # every prefix now in the radix cache
    with Engine(**args, chunked_prefill_size=16, disable_radix_cache=True) as engine:
        chunked = _ids(engine.generate(PROMPTS, PARAMS))
    assert alone == together[:8]
    assert [shuffled[order.index(i)] for i in range(len(PROMPTS))] == together
    assert warm == together
    assert chunked == together


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory, smollm2_dir):
    return build_tiny(_gemma2, tmp_path_factory.mktemp("tiny-gemma2"), smollm2_dir)


def test_batch_invariant_attention_matches_transformers(tiny_gemma2):
    args = dict(attention_backend="auto", enable_deterministic_inference=True)
    check_logits(tiny_gemma2, **args)
    check_greedy(tiny_gemma2, **args)
    check_greedy(tiny_gemma2, chunked_prefill_size=16, **args)


def test_the_flag_keeps_its_own_attention():
    from sglbatch.engine.config import EngineConfig

    with pytest.raises(ValueError, match="leave attention_backend at auto"):
        EngineConfig(enable_deterministic_inference=True, attention_backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 200], ids=["full", "window200"])
@pytest.mark.parametrize("backend_cls", [
    pytest.param(CpuDeterministicBackend, id="cpu-kernel", marks=pytest.mark.skipif(
        cpu_kernels.load("extend_attention") is None, reason="no CPU kernels here")),
    pytest.param(DeterministicBackend, id="torch")])
def test_a_row_gets_the_same_bits_in_any_batch(dtype, window, backend_cls):
    """Both batch-invariant attentions: a row's output has the same bits computed in one
    pass over its 300-token prompt, in chunks beside another request, or alone as a decode
    row; and it is attention (the torch backend's, within the dtype's tolerance). A window
    of 200 spans two of the CPU kernel's key blocks, which must sit at fixed positions."""
    kv_heads, group, dim = 3, 3, 64
    heads = kv_heads * group
    layers = (LayerAttention(dim ** -0.5, sliding_window=window),)
    r = ragged_batch([0], [300], kv_heads, dim, dtype, seed=7)
    pool = _pool(r)  # K/V of every position already in the pool: forward(kv_stored=True)
    row, slots, table = int(r.req_pool_indices[0]), r.new_loc, r.req_to_token
    other_row = next(i for i in range(len(table)) if i != row)
    table[other_row, :20] = slots[:20]  # a neighbour request reading 20 of the same keys
    q, _, _ = _inputs(300, kv_heads, group, dim, dtype, seed=8)
    q_other, _, _ = _inputs(1, kv_heads, group, dim, dtype, seed=9)
    backend = backend_cls(pool, heads, kv_heads, dim, layers)

    def batch(mode, rows, prefix_lens, extend_lens):
        fb = _forward_batch(mode, table, rows, prefix_lens, extend_lens,
                            torch.zeros(sum(extend_lens), dtype=torch.int64))
        fb.positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens,
                                                                         extend_lens)])
        return fb

    def run(rows, prefix_lens, extend_lens, q_rows):
        fb = batch(ForwardMode.EXTEND, rows, prefix_lens, extend_lens)
        backend.init_forward_metadata(fb)
        return backend.forward(q_rows, None, None, 0, fb, kv_stored=True)

    whole = run([row], [0], [300], q)
    expected = forward_reference(q, pool, 0, batch(ForwardMode.EXTEND, [row], [0], [300]),
                                 layers[0], heads)
    torch.testing.assert_close(whole.float(), expected.float(), **tolerance(dtype))
    done, chunked = 0, []
    for chunk in (128, 100, 72):
        out = run([other_row, row], [19, done], [1, chunk], torch.cat([q_other, q[done:][:chunk]]))
        chunked.append(out[1:])
        done += chunk
    assert torch.equal(torch.cat(chunked), whole)
    for p in (0, 89, 127, 128, 200, 299):
        decode = batch(ForwardMode.DECODE, [other_row, row], [19, p], [1, 1])
        backend.init_forward_metadata(decode)
        alone = backend.forward(torch.cat([q_other, q[p:p + 1]]), None, None, 0, decode,
                                kv_stored=True)
        assert torch.equal(alone[1], whole[p]), p
