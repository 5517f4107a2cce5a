"""GGUF conversion of Llama-3.1 (rope_freqs), Qwen3, Gemma 2 and Gemma 3 layouts.

Each test builds a tiny random transformers model, writes it as a GGUF the way llama.cpp's
convert_hf_to_gguf does (names from gguf-py's own tensor map, llama's q/k permutation, Gemma's
`1 + w` norms, the metadata each converter writes, Llama-3's rope_freqs tensor), converts it
back with our converter and checks transformers gives the original model's logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sglbatch.engine.model_source import resolve_model_path
from tests.engine.test_model_source import TOKENS, add_tiny_tokenizer

TINY = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=None)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0}
# Not Llama-3.x's values: the converter has to fit them to the tensor.
CUSTOM_ROPE = {**LLAMA31_ROPE, "factor": 16.0, "low_freq_factor": 1.5, "high_freq_factor": 12.0}
GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3"}


def _tiny(kind: str):
    import transformers as tf

    if kind in ("llama31", "llama-custom-rope"):
        rope = LLAMA31_ROPE if kind == "llama31" else CUSTOM_ROPE
        # head_dim 64 with theta 5e5 puts several frequencies in llama3's smoothed band
        cfg = tf.LlamaConfig(**TINY, num_hidden_layers=2, head_dim=64, rope_parameters=rope,
                             max_position_embeddings=131072, tie_word_embeddings=True)
        return tf.LlamaForCausalLM(cfg)
    if kind == "qwen3":
        cfg = tf.Qwen3Config(**TINY, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                             max_position_embeddings=4096)
        return tf.Qwen3ForCausalLM(cfg)
    if kind == "gemma2":  # small window and caps so that both change the logits
        cfg = tf.Gemma2Config(**TINY, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=5, attn_logit_softcapping=3.0,
                              final_logit_softcapping=4.0, max_position_embeddings=8192)
        return tf.Gemma2ForCausalLM(cfg)
    if kind == "gemma3":  # 7 layers: sliding 0-4, global 5, sliding 6
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        cfg = tf.Gemma3TextConfig(**TINY, num_hidden_layers=7, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=5,
                                  rope_parameters=rope, max_position_embeddings=32768)
        return tf.Gemma3ForCausalLM(cfg)
    raise AssertionError(kind)


def tiny_model(kind: str):
    torch.manual_seed(0)
    model = _tiny(kind)
    model.config._attn_implementation = "eager"  # Gemma's soft-cap needs eager; same for all
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma): randomise everything
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


# --- a writer in llama.cpp's layout (what convert_hf_to_gguf.py produces) ---------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _llamacpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's generate_extra_tensors for llama3 rope (float32 freqs, 8192 context: it
    reads original_max_position_embeddings from the top-level config, where HF has none)."""
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high, ctx = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], 8192
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < ctx / high:
            out.append(1)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_llamacpp_gguf(model, path: Path, *, rope_freqs: np.ndarray | None = None) -> None:
    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    gemma = arch.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    rope = cfg.rope_parameters
    if arch == "gemma2":  # Gemma2Model writes no rope base
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    elif arch == "gemma3":
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
        if rope["full_attention"]["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["full_attention"]["factor"])
    else:
        w.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
    add_tiny_tokenizer(w)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        if gemma and name.endswith("norm.weight"):
            data = data + 1
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        w.add_tensor(new, data)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- tests ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path / "cache"))


def _ids(n: int = 40) -> torch.Tensor:
    return torch.randint(0, len(TOKENS), (1, n), generator=torch.Generator().manual_seed(3))


def _convert(model, tmp_path: Path, name: str) -> Path:
    """Write `model` as llama.cpp would (Llama with its rope_freqs) and convert it back."""
    path = tmp_path / f"{name}.gguf"
    freqs = None
    if model.config.model_type == "llama":
        freqs = _llamacpp_rope_freqs(model.config.rope_parameters, model.config.head_dim)
    write_llamacpp_gguf(model, path, rope_freqs=freqs)
    return resolve_model_path(str(path))


def _load(model_dir: Path, **overrides):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **overrides).eval()


def _max_diff(a, b, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("kind", ["llama31", "llama-custom-rope", "qwen3", "gemma2", "gemma3"])
def test_converted_model_gives_the_original_logits(tmp_path: Path, kind: str) -> None:
    ref = tiny_model(kind)
    model_dir = _convert(ref, tmp_path, kind)
    ours = _load(model_dir)
    assert type(ours) is type(ref)
    assert _max_diff(ours, ref, _ids()) < 1e-5
    assert torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight) == \
        ref.config.tie_word_embeddings


def test_llama31_rope_scaling_recovered(tmp_path: Path) -> None:
    ref = tiny_model("llama31")
    model_dir = _convert(ref, tmp_path, "llama31")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["rope_parameters"] == LLAMA31_ROPE
    assert config["max_position_embeddings"] == 131072
    # The scaling matters here: the same weights with plain RoPE give other logits.
    plain = _load(model_dir, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert _max_diff(plain, ref, _ids()) > 1e-3


def test_nonstandard_llama3_parameters_are_fitted(tmp_path: Path) -> None:
    model_dir = _convert(tiny_model("llama-custom-rope"), tmp_path, "custom")
    rope = json.loads((model_dir / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 16.0
    for key in ("low_freq_factor", "high_freq_factor"):
        assert rope[key] == pytest.approx(CUSTOM_ROPE[key], rel=1e-4), key


def test_qwen3_config(tmp_path: Path) -> None:
    model_dir = _convert(tiny_model("qwen3"), tmp_path, "qwen3")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["head_dim"], config["rope_theta"], config["tie_word_embeddings"]) == \
        (32, 1e6, False)
    assert config["attention_bias"] is False


def test_gemma_configs(tmp_path: Path) -> None:
    g2 = _convert(tiny_model("gemma2"), tmp_path, "gemma2")
    c2 = json.loads((g2 / "config.json").read_text())
    assert (c2["architectures"], c2["model_type"]) == (["Gemma2ForCausalLM"], "gemma2")
    assert (c2["attn_logit_softcapping"], c2["final_logit_softcapping"]) == (3.0, 4.0)
    assert (c2["sliding_window"], c2["query_pre_attn_scalar"], c2["head_dim"]) == (5, 16, 16)
    assert c2["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert c2["rope_theta"] == 10000.0 and c2["tie_word_embeddings"] is True
    g3 = _convert(tiny_model("gemma3"), tmp_path, "gemma3")
    c3 = json.loads((g3 / "config.json").read_text())
    assert (c3["architectures"], c3["model_type"]) == (["Gemma3ForCausalLM"], "gemma3_text")
    assert c3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (c3["rope_theta"], c3["rope_local_base_freq"]) == (1e6, 10000.0)
    assert c3["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert c3["rope_parameters"]["full_attention"] == {
        "rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert c3["final_logit_softcapping"] is None and c3["sliding_window"] == 5


def test_rope_freqs_that_fit_no_llama3_scaling_are_refused(tmp_path: Path) -> None:
    model = tiny_model("llama31")
    bad = _llamacpp_rope_freqs(LLAMA31_ROPE, 64)
    bad[3] = 2.5  # a short wavelength scaled: not llama3's shape
    path = tmp_path / "bad.gguf"
    write_llamacpp_gguf(model, path, rope_freqs=bad)
    with pytest.raises(ValueError, match="rope_freqs.weight.*matches no llama3 rope scaling"):
        resolve_model_path(str(path))
    write_llamacpp_gguf(model, path, rope_freqs=bad[:10])
    with pytest.raises(ValueError, match="rope_freqs.weight.*has 10 values"):
        resolve_model_path(str(path))


def test_rope_freqs_outside_llama_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "qwen3-freqs.gguf"
    write_llamacpp_gguf(tiny_model("qwen3"), path, rope_freqs=np.ones(16, dtype=np.float32))
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        resolve_model_path(str(path))


def _config_of(path: Path, arch: str, layers: int, hidden: int, heads: int, head_dim: int,
               tensors: dict[str, np.ndarray] | None = None, **meta: float) -> dict:
    """hf_config of a GGUF holding metadata and only the tensors hf_config reads."""
    from sglbatch.engine.gguf_convert import read_config

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(4 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_key_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    for key, value in meta.items():
        w.add_float32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((4, hidden), dtype=np.float32))
    for name, data in (tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_config(path)


@pytest.mark.parametrize("arch,layers,hidden,heads,head_dim,scalar", [
    ("gemma2", 26, 2304, 8, 256, 256), ("gemma2", 46, 4608, 32, 128, 144),  # 2B, 27B
    ("gemma3", 18, 640, 4, 256, 256), ("gemma3", 62, 5376, 32, 128, 168),  # 270M, 27B
])
def test_gemma_attention_scale_follows_llama_cpp(tmp_path: Path, arch: str, layers: int,
                                                 hidden: int, heads: int, head_dim: int,
                                                 scalar: int) -> None:
    config = _config_of(tmp_path / "m.gguf", arch, layers, hidden, heads, head_dim)
    assert config["query_pre_attn_scalar"] == scalar


def test_gemma3_without_sliding_window_is_all_global(tmp_path: Path) -> None:
    config = _config_of(tmp_path / "m.gguf", "gemma3", 6, 64, 4, 16)
    assert config["layer_types"] == ["full_attention"] * 6 and config["sliding_window"] is None


def test_gemma2_separate_sliding_rope_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sliding-window RoPE base"):
        _config_of(tmp_path / "m.gguf", "gemma2", 2, 64, 4, 16, **{"rope.freq_base_swa": 1e4,
                                                                   "rope.freq_base": 1e6})


@pytest.mark.parametrize("head_dim,rope", [
    (128, LLAMA31_ROPE),  # Llama-3.1 8B
    (64, {**LLAMA31_ROPE, "factor": 32.0}),  # Llama-3.2 1B
    (16, {**LLAMA31_ROPE, "low_freq_factor": 0.5, "high_freq_factor": 3.0}),  # 1 smoothed
    (16, {**LLAMA31_ROPE, "low_freq_factor": 2.0, "high_freq_factor": 3.0}),  # none smoothed
    (128, {**LLAMA31_ROPE, "factor": 4.0, "low_freq_factor": 0.5, "high_freq_factor": 6.0}),
])
def test_rope_freqs_become_llama3_parameters_that_reproduce_them(
        tmp_path: Path, head_dim: int, rope: dict) -> None:
    from sglbatch.engine.gguf_convert import llama3_factors

    freqs = _llamacpp_rope_freqs(rope, head_dim)
    config = _config_of(tmp_path / "m.gguf", "llama", 2, 4 * head_dim, 4, head_dim,
                        tensors={"rope_freqs.weight": freqs}, **{"rope.freq_base": 500000.0})
    params = config["rope_parameters"]
    assert params["rope_type"] == "llama3" and params["factor"] == rope["factor"]
    if rope["low_freq_factor"] == 1.0 and rope["high_freq_factor"] == 4.0:
        assert params == rope
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(llama3_factors(params, inv_freq), freqs, rtol=1e-5)


# --- through the engine, where the family is registered ---------------------------------------


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("kind", ["llama31", "qwen3", "gemma2", "gemma3"])
def test_engine_greedy_matches_transformers(tmp_path: Path, kind: str) -> None:
    from sglbatch.engine.engine import Engine
    from sglbatch.engine.models import supported_architectures

    ref = tiny_model(kind)
    arch = type(ref).__name__
    if arch not in supported_architectures():
        pytest.skip(f"{arch} is not registered in sglbatch.engine.models yet")
    path = tmp_path / f"{kind}.gguf"
    freqs = _llamacpp_rope_freqs(ref.config.rope_parameters, 64) if kind == "llama31" else None
    write_llamacpp_gguf(ref, path, rope_freqs=freqs)
    prompts = [_ids(n)[0].tolist() for n in (3, 17)]
    with Engine(model_path=str(path), dtype="float32", attention_backend="torch",
                max_total_tokens=256, max_running_requests=4) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={
            "temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    for prompt, out in zip(prompts, outs):
        assert out["output_ids"] == _hf_greedy(ref, prompt, 8)
