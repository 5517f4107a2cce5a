"""The MoE layer (layers/moe.py) against transformers' own MoE blocks, its oneDNN-packed CPU
path against the plain one, and expert checkpoints (per expert, or stacked as transformers 5
holds them) loading and splitting over tensor-parallel ranks the same way."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.moe import (
    FusedExperts,
    SparseMoeBlock,
    fused_experts_reference,
    pack_experts,
    select_experts,
)
from tests.device_follow import DeviceCheck, assert_all_named

HIDDEN, INTER, SHARED, EXPERTS = 32, 24, 40, 8


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def _hf_block(kind: str, norm_topk_prob: bool = False):
    import transformers as tf
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    common = dict(hidden_size=HIDDEN, num_experts_per_tok=2)
    if kind == "mixtral":
        block = MixtralSparseMoeBlock(tf.MixtralConfig(**common, intermediate_size=INTER,
                                                       num_local_experts=EXPERTS))
    elif kind == "qwen2_moe":
        block = Qwen2MoeSparseMoeBlock(tf.Qwen2MoeConfig(
            **common, moe_intermediate_size=INTER, num_experts=EXPERTS,
            shared_expert_intermediate_size=SHARED, norm_topk_prob=norm_topk_prob))
    else:
        block = Qwen3MoeSparseMoeBlock(tf.Qwen3MoeConfig(
            **common, moe_intermediate_size=INTER, num_experts=EXPERTS,
            norm_topk_prob=norm_topk_prob))
    _randomise(block)
    return block.eval()


def _ours_from(hf, renormalize: bool) -> SparseMoeBlock:
    shared = getattr(hf, "shared_expert", None)
    ours = SparseMoeBlock(HIDDEN, EXPERTS, 2, INTER, renormalize, None,
                          SHARED if shared is not None else None)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.experts.w13.copy_(hf.experts.gate_up_proj)
        ours.experts.w2.copy_(hf.experts.down_proj)
        if shared is not None:
            ours.shared_expert.gate_up_proj.weight.copy_(
                torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
            ours.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
            ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    return ours.eval()


@pytest.mark.parametrize("kind,norm_topk_prob,renormalize", [
    ("mixtral", False, True), ("qwen2_moe", False, False), ("qwen2_moe", True, True),
    ("qwen3_moe", True, True), ("qwen3_moe", False, False)])
def test_block_matches_transformers(kind, norm_topk_prob, renormalize):
    hf = _hf_block(kind, norm_topk_prob)
    ours = _ours_from(hf, renormalize)
    x = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), DeviceCheck() as check:
        out = ours(x.view(-1, HIDDEN))
    assert_all_named(check)
    with torch.no_grad():
        ref = hf(x)
    torch.testing.assert_close(out, ref.reshape(-1, HIDDEN), atol=1e-5, rtol=1e-5)


def test_routing_renormalises_only_when_asked():
    logits = torch.randn(5, EXPERTS, generator=torch.Generator().manual_seed(2))
    plain, ids = select_experts(logits, 3, False)
    renormed, same_ids = select_experts(logits, 3, True)
    assert torch.equal(ids, same_ids) and plain.dtype == torch.float32
    torch.testing.assert_close(plain, logits.softmax(-1).gather(1, ids))
    torch.testing.assert_close(renormed, plain / plain.sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_packed_experts_match_unpacked(dtype, tokens):
    experts = FusedExperts(EXPERTS, HIDDEN, INTER)
    _randomise(experts)
    experts.to(dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
    weights, ids = select_experts(torch.randn(tokens, EXPERTS, generator=gen), 2, True)
    ref = fused_experts_reference(x, experts.w13, experts.w2, weights, ids)
    holder = torch.nn.Sequential(experts)
    if pack_experts(holder) == 0:
        pytest.skip("oneDNN cannot pack this dtype on this CPU")
    assert experts.w13 is None and not list(experts.parameters())  # not held twice
    with DeviceCheck() as check:
        out = experts(x, weights, ids)
    assert_all_named(check)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, ref, **tol)


# --- checkpoints ---

def _save(tmp_path, factory, stacked: bool):
    torch.manual_seed(0)
    model = factory()
    _randomise(model)
    path = tmp_path / ("stacked" if stacked else "per-expert")
    model.save_pretrained(path, save_original_format=not stacked)
    return path


def _tiny_mixtral():
    import transformers as tf

    return tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2))


def _tiny_qwen2_moe():
    import transformers as tf

    return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=INTER, shared_expert_intermediate_size=SHARED))


def _load(path, tp_size: int, rank: int) -> dict[str, torch.Tensor]:
    from sglbatch.engine.loader import load_weights
    from sglbatch.engine.models import create_model
    from sglbatch.engine.parallel.shard import plan_shards

    config = ModelConfig.from_dir(path)
    model = create_model(config, plan_shards(config, tp_size)[rank])
    load_weights(model, path, torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("factory", [_tiny_mixtral, _tiny_qwen2_moe],
                         ids=["mixtral", "qwen2_moe"])
def test_stacked_and_per_expert_checkpoints_load_alike(tmp_path, factory):
    per_expert = _save(tmp_path, factory, stacked=False)
    stacked = _save(tmp_path, factory, stacked=True)
    whole = _load(per_expert, 1, 0)
    assert whole.keys() == _load(stacked, 1, 0).keys()
    for a, b in zip(whole.values(), _load(stacked, 1, 0).values()):
        assert torch.equal(a, b)
    w13 = whole["model.layers.0.mlp.experts.w13"]
    for rank in range(2):
        parts = _load(per_expert, 2, rank)
        for name, tensor in _load(stacked, 2, rank).items():
            assert torch.equal(tensor, parts[name]), name
        # Rank r holds rows r*12.. of each expert's gate and of its up half.
        gate, up = w13[:, rank * 12:(rank + 1) * 12], w13[:, INTER + rank * 12:][:, :12]
        assert torch.equal(parts["model.layers.0.mlp.experts.w13"], torch.cat([gate, up], 1))
        assert torch.equal(parts["model.layers.0.mlp.experts.w2"],
                           whole["model.layers.0.mlp.experts.w2"][:, :, rank * 12:][..., :12])


def test_plan_splits_expert_and_shared_columns():
    from sglbatch.engine.parallel.shard import plan_shards
    from tests.engine.conftest import TINY_LLAMA

    moe = dataclasses.replace(TINY_LLAMA, hf={"moe_intermediate_size": 5,
                                              "shared_expert_intermediate_size": 8})
    shards = plan_shards(moe, 2)
    assert [s.expert_intermediate for s in shards] == [range(0, 3), range(3, 5)]
    assert [s.shared_intermediate for s in shards] == [range(0, 4), range(4, 8)]
    assert plan_shards(TINY_LLAMA, 2)[1].expert_intermediate == range(48, 96)  # Mixtral's
    with pytest.raises(ValueError, match="tp_size=6 is more ranks than an MoE expert's 5"):
        plan_shards(moe, 6)
