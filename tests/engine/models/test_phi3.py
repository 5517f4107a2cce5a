"""Phi-3 (fused qkv_proj / gate_up_proj checkpoints, longrope scaling, partial rotary, a
sliding window) matches transformers on tiny random checkpoints, also over two
tensor-parallel ranks (each must take its q/k/v and gate/up rows out of the fused tensors).

transformers picks longrope's short or long factors per forward pass by the current
length; the engine picks once, by the served context length. The two agree when the served
context fits the pretraining length (short factors throughout: "short") and when every
sequence is longer than it ("long")."""

from __future__ import annotations

import pytest

from tests.engine.models.tiny_check import MatchesOverTwoRanks, build_tiny

ORIGINAL_MAX = {"short": 128, "long": 16}
SERVED = {"short": {"context_length": 128}, "long": {}}  # long: the checkpoint's 512


def _phi3(kind: str):
    import transformers as tf

    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.0, 3.0, 5.0],
            "long_factor": [1.5, 2.0, 3.0, 5.0, 9.0, 17.0]}
    return tf.Phi3ForCausalLM(tf.Phi3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        original_max_position_embeddings=ORIGINAL_MAX[kind], rope_parameters=rope,
        partial_rotary_factor=0.75, sliding_window=24, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))


@pytest.fixture(scope="module", params=["short", "long"])
def tiny(request, tmp_path_factory, smollm2_dir):
    kind = request.param
    lens = (5, 23, 41, 70) if kind == "short" else (23, 41, 70)  # long: all past 16
    return build_tiny(lambda: _phi3(kind), tmp_path_factory.mktemp(f"tiny-phi3-{kind}"),
                      smollm2_dir, prompt_lens=lens, engine_args=SERVED[kind])


class TestPhi3(MatchesOverTwoRanks):
    pass
