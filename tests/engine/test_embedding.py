"""EmbeddingModel (BERT in torch + sentence-transformers pooling) against sentence-transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sglbatch.engine.embedding import EmbeddingModel
from sglbatch.engine.model_source import cache_dir, resolve_model_path
from tests.device_follow import DeviceCheck, assert_all_named

# Varied lengths: empty, one word, sentences, unicode, and one past max_seq_length (256).
SENTENCES = [
    "Hello",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "Café crème brûlée — naïve façade, 東京 and emoji 🙂 too!",
    ("Sentence embeddings map text to dense vectors so that similar meanings land close "
     "together; mean pooling averages the token states and the result is L2-normalized."),
    "def add(a, b):\n    return a + b\n",
    "many words " * 150,  # 302 tokens > 256: truncated, as sentence-transformers does
]


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference(model: EmbeddingModel):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(model.model_dir), device="cpu")


def _vectors(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(ours, ref.to(ours.dtype), dim=1)
    assert cos.min() > 0.999, cos
    assert torch.allclose(ours.norm(dim=1), ref.to(ours.dtype).norm(dim=1), rtol=1e-3)


def test_alias_resolves_to_sentence_transformers_dir(model: EmbeddingModel) -> None:
    path = model.model_dir
    assert path.parent == cache_dir() / "models"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json",
                 "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (path / name).is_file(), name
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("All-MiniLM-L6-v2") == path  # cached: no second download
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    assert (model.dim, model.max_seq_length, model.model_name) == (384, 256, "all-minilm-l6-v2")
    assert (model.pooling, model.normalize) == ("mean_tokens", True)


def test_matches_sentence_transformers(model: EmbeddingModel, reference) -> None:
    ours = _vectors(model.encode(SENTENCES))
    ref = reference.encode(SENTENCES, convert_to_tensor=True)
    assert ours.shape == (len(SENTENCES), 384)
    _assert_close(ours, ref)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES), dtype=ours.dtype),
                          atol=1e-5)
    # Meaning, not just numbers: the paraphrase is nearer than the unrelated sentence.
    a, b, c = _vectors(model.encode(["A man is eating food.", "A man is eating a piece of bread.",
                                     "The stock market fell sharply today."]))
    assert a @ b > a @ c + 0.3


def test_padding_and_batching_do_not_change_vectors(model: EmbeddingModel) -> None:
    with DeviceCheck() as check:
        batched = model.encode(SENTENCES)
    assert_all_named(check)
    batched = _vectors(batched)
    alone = _vectors([model.encode([s])[0] for s in SENTENCES])
    small_batches = _vectors(model.encode(SENTENCES, batch_size=3))
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(batched, small_batches, atol=1e-5)


def test_token_id_inputs(model: EmbeddingModel, reference) -> None:
    ids = model.tokenize(SENTENCES)
    ref_ids = reference.tokenizer(SENTENCES, truncation=True, max_length=256)["input_ids"]
    assert ids == ref_ids
    assert model.count_tokens(SENTENCES) == [len(x) for x in ref_ids]
    assert model.count_tokens(SENTENCES)[-1] == 256
    assert torch.allclose(_vectors(model.encode(ids)), _vectors(model.encode(SENTENCES)),
                          atol=1e-6)
    # Token ids are taken as they are: no [CLS]/[SEP] added around them.
    bare = ids[0][1:-1]
    assert model.count_tokens([bare]) == [len(bare)]
    assert not torch.allclose(_vectors(model.encode([bare])), _vectors(model.encode(ids[:1])))
    assert model.encode([]) == []


def test_too_long_input_is_refused_without_truncation(model: EmbeddingModel) -> None:
    long_text = SENTENCES[-1]
    with pytest.raises(ValueError, match=r"input\[1\] is 302 tokens long.*maximum of 256"):
        model.encode(["short", long_text], truncate=False)
    with pytest.raises(ValueError, match=r"input\[0\] is 300 tokens long.*maximum of 256"):
        model.count_tokens([[101] * 300], truncate=False)
    assert model.count_tokens([long_text, [101] * 300]) == [256, 256]  # truncate=True: cut
    exact = [101] * 256  # exactly the limit is fine either way
    assert model.count_tokens([exact], truncate=False) == [256]


def test_invalid_inputs(model: EmbeddingModel) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        model.encode("a bare string")
    with pytest.raises(ValueError, match=r"input\[1\] is an empty list"):
        model.encode(["fine", []])
    with pytest.raises(ValueError, match=r"input\[0\] has token id 30522 outside"):
        model.encode([[101, 30522, 102]])
    with pytest.raises(TypeError, match=r"input\[0\] must be a string or a list"):
        model.encode([3.5])


def _variant_dir(src: Path, dst: Path, pooling: str, normalize: bool) -> Path:
    """A copy of the model dir with another pooling mode (and Normalize on or off)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    pool_cfg = json.loads((dst / "1_Pooling" / "config.json").read_text())
    for key in [k for k in pool_cfg if k.startswith("pooling_mode_")]:
        pool_cfg[key] = key == f"pooling_mode_{pooling}"
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    modules = json.loads((dst / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (dst / "modules.json").write_text(json.dumps(modules))
    return dst


@pytest.mark.parametrize("pooling", ["cls_token", "max_tokens", "mean_sqrt_len_tokens"])
def test_other_pooling_modes_match_sentence_transformers(
        model: EmbeddingModel, reference, tmp_path: Path, pooling: str) -> None:
    variant = _variant_dir(model.model_dir, tmp_path / "variant", pooling, normalize=False)
    ours = EmbeddingModel(str(variant))
    assert (ours.pooling, ours.normalize) == (pooling, False)
    ref = type(reference)(str(variant), device="cpu")
    texts = SENTENCES[:6]
    _assert_close(_vectors(ours.encode(texts)), ref.encode(texts, convert_to_tensor=True))


def test_pytorch_bin_checkpoint_with_prefix(model: EmbeddingModel, tmp_path: Path) -> None:
    """A BertForX-style pytorch_model.bin ("bert." names) loads to the same model."""
    variant = tmp_path / "bin"
    shutil.copytree(model.model_dir, variant,
                    ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(model.model_dir / "model.safetensors")
    torch.save({f"bert.{k}": v for k, v in weights.items()}, variant / "pytorch_model.bin")
    texts = SENTENCES[:4]
    assert _vectors(EmbeddingModel(str(variant)).encode(texts)).allclose(
        _vectors(model.encode(texts)), atol=1e-6)


def test_bfloat16_stays_close(model: EmbeddingModel) -> None:
    low = EmbeddingModel("all-minilm-l6-v2", dtype="bfloat16")
    texts = SENTENCES[:6]
    cos = torch.nn.functional.cosine_similarity(
        _vectors(low.encode(texts)), _vectors(model.encode(texts)), dim=1)
    assert cos.min() > 0.99


def test_unsupported_models_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' is not supported for embeddings"):
        EmbeddingModel(str(tmp_path))
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        EmbeddingModel("all-minilm-l6-v2", dtype="int8")
    with pytest.raises(FileNotFoundError, match="is no directory.*all-minilm-l6-v2"):
        EmbeddingModel(str(tmp_path / "missing"))
