"""Sampler: filters keep the right tokens, draws follow the distribution, seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine.request import Req
from sglbatch.engine.sampler import SamplingBatch, sample, seeded_uniform
from sglbatch.engine.sampling_params import SamplingParams


def _batch(params: list[dict], seeds: list[int], steps: list[int] | None = None,
           vocab: int = 8) -> SamplingBatch:
    reqs = []
    for i, (p, seed) in enumerate(zip(params, seeds)):
        req = Req(f"r{i}", [1], SamplingParams(**p), seed=seed)
        req.output_ids = [0] * (steps[i] if steps else 0)
        reqs.append(req)
    return SamplingBatch(reqs, vocab)


LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0]]) + 1e-12)


def _draws(params: dict, n: int = 4000) -> torch.Tensor:
    sb = _batch([params] * n, seeds=list(range(n)))
    return sample(LOGITS.expand(n, -1).clone(), sb)


def test_greedy_is_argmax():
    sb = _batch([{"temperature": 0}, {"top_k": 1}], seeds=[1, 2])
    logits = torch.randn(2, 8)
    assert sample(logits, sb).tolist() == logits.argmax(-1).tolist()


def test_temperature_one_follows_the_distribution():
    counts = torch.bincount(_draws({}), minlength=8).float() / 4000
    expected = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0, 0, 0])
    assert (counts - expected).abs().max() < 0.03, counts


def test_top_k_top_p_min_p_keep_only_the_allowed_tokens():
    assert set(_draws({"top_k": 2}).tolist()) == {0, 1}
    # top_p=0.7: 0.4 < 0.7 so token 1 crosses the line and stays; token 2 never appears.
    assert set(_draws({"top_p": 0.7}).tolist()) == {0, 1}
    # min_p=0.3: keep tokens with p >= 0.3 * 0.4 = 0.12.
    assert set(_draws({"min_p": 0.3}).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_temperature_scales_the_logits(temperature):
    counts = torch.bincount(_draws({"temperature": temperature}), minlength=8).float() / 4000
    expected = torch.softmax(LOGITS[0] / temperature, dim=-1)
    assert (counts - expected).abs().max() < 0.03, (counts, expected)


def test_seed_reproduces_whatever_the_batch():
    logits = torch.randn(1, 1000)
    alone = sample(logits.clone(), _batch([{}], seeds=[42], steps=[5], vocab=1000))
    others = torch.randn(3, 1000)
    batch = sample(torch.cat([others, logits]),
                   _batch([{}, {"top_p": 0.9}, {"temperature": 0}, {}], seeds=[1, 2, 3, 42],
                          steps=[0, 9, 3, 5], vocab=1000))
    assert batch[3] == alone[0]


def test_seeded_noise_is_uniform_and_varies_by_seed_and_step():
    u = seeded_uniform(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 63, 64, 49152, 49159])
def test_greedy_argmax_kernel_is_torchs_argmax(dtype, vocab):
    """The CPU kernel's argmax, on the model's dtype, is torch's on fp32: the first index of
    the maximum (ties included, at either side of a vector's width, and -0 tied with +0),
    the first NaN of either sign where a row holds one, and index 0 for a row of -inf."""
    logits = torch.randn(7, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    last = vocab - 1
    logits[1, last // 2] = logits[1, last] = 1e4 if dtype != torch.float16 else 6e4  # a tie
    logits[2, last] = float("nan")
    logits[2, last // 3] = float("nan")
    logits[3] = float("-inf")
    logits[4, last] = 1e4 if dtype != torch.float16 else 6e4  # the maximum in the tail
    logits[5] = -1.0
    logits[5, last // 2], logits[5, last] = -0.0, 0.0  # -0 equals +0: the first one counts
    logits[6, last // 2] = -logits.new_tensor(float("nan"))  # a NaN with its sign bit set
    sb = _batch([{"temperature": 0}] * 7, seeds=list(range(7)), vocab=vocab)
    assert sample(logits, sb).tolist() == logits.float().argmax(-1).tolist()
