"""The document encoder's batching: length-sorted, padded per batch, and
identical (up to float rounding) to upstream's padded-per-call encoding."""

from __future__ import annotations

import pytest
import torch

from app.engine.encoder import ColBERTEncoder, length_batches, pad_batch
from colbert_patches.model_loading import EncoderOptions


def test_length_batches_cover_every_text_once_within_the_budget():
    lengths = [5, 40, 3, 40, 12, 7, 39, 1, 25, 40, 2]
    batches = length_batches(lengths, batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        widths = [lengths[i] for i in b]
        assert widths == sorted(widths)
        assert len(b) == 1 or len(b) * max(widths) <= 80
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # batches in ascending length order


def test_a_text_longer_than_the_budget_gets_a_batch_of_its_own():
    batches = length_batches([10, 500], batch_tokens=64)
    assert batches == [[0], [1]]


def test_pad_batch_masks_only_real_tokens():
    ids, mask = pad_batch([[101, 7, 102], [101, 102]], pad_id=0)
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.slow
def test_encoding_matches_upstream_doc_from_text(checkpoint_dir):
    encoder = ColBERTEncoder(str(checkpoint_dir), EncoderOptions.for_checkpoint(str(checkpoint_dir)))
    texts = ["a", "the quick brown fox jumps over the lazy dog " * 12, "short one", "", "mid length text " * 5]
    with torch.inference_mode():
        expected, expected_lens = encoder.checkpoint.docFromText(texts, bsize=2, keep_dims="flatten", to_cpu=True)
    embs, doclens = encoder.encode_documents(texts)
    assert doclens == [int(n) for n in expected_lens]
    assert embs.dtype == torch.float16 and embs.shape == expected.shape
    assert torch.allclose(embs.float(), expected.float(), atol=2e-3)
    with torch.inference_mode():
        queries = encoder.checkpoint.queryFromText(["what is a fox", "dogs"], bsize=8, to_cpu=True)
    assert torch.allclose(encoder.encode_queries(["what is a fox", "dogs"]), queries.float(), atol=1e-5)


@pytest.mark.slow
def test_the_dense_vector_is_the_base_models_sentence_embedding_from_the_same_pass(checkpoint_dir):
    """The default checkpoint's pooled head: all-MiniLM-L6-v2's own sentence
    vector (mean pooling over the attended positions, normalised), for
    passages and queries alike, computed here straight from the bundled model."""
    from transformers import AutoModel, AutoTokenizer

    from models.build_default_checkpoint import bundled_minilm_dir

    encoder = ColBERTEncoder(str(checkpoint_dir), EncoderOptions.for_checkpoint(str(checkpoint_dir)))
    assert encoder.dense_dim == 384
    texts = ["Sea otters hold hands while they sleep.", "the quick brown fox jumps over the lazy dog " * 3, "a"]
    encoded = encoder.encode_passages(texts)
    assert encoded.dense is not None and encoded.dense.shape == (3, 384) and encoded.dense.dtype == torch.float16

    path = bundled_minilm_dir()
    tok, model = AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path)).eval()

    def sentence_vectors(batch: list[str]) -> torch.Tensor:
        inputs = tok(batch, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**inputs).last_hidden_state
        weights = inputs["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    assert torch.allclose(encoded.dense.float(), sentence_vectors(texts), atol=2e-3)
    Q, q = encoder.encode_query("do otters sleep holding hands")
    assert Q.shape[0] == 1 and Q.shape[2] == encoder.dim
    assert q is not None and torch.allclose(q, sentence_vectors(["do otters sleep holding hands"]), atol=1e-4)
    # Token vectors of the same pass are unchanged by it.
    assert torch.allclose(encoder.encode_documents(texts)[0].float(), encoded.embs.float())

    plain = ColBERTEncoder(
        str(checkpoint_dir), EncoderOptions.for_checkpoint(str(checkpoint_dir), dense_pooling="none")
    )
    assert plain.dense_dim is None and plain.encode_passages(texts).dense is None
    assert plain.encode_query("otters")[1] is None


@pytest.mark.slow
def test_onnx_runtimes_encode_like_torch_from_one_cached_export(checkpoint_dir, tmp_path):
    from models.export_colbert_onnx import DONE_MARKER, export_dir_name

    options = EncoderOptions.for_checkpoint(str(checkpoint_dir))
    texts = ["a", "the quick brown fox, jumps over the lazy dog! " * 8, "short one", "mid length text " * 5]
    reference, lens = ColBERTEncoder(str(checkpoint_dir), options).encode_documents(texts)
    fp32 = ColBERTEncoder(str(checkpoint_dir), options, runtime="onnx", models_dir=tmp_path)
    export = tmp_path / export_dir_name(str(checkpoint_dir))
    assert (export / DONE_MARKER).exists()
    stamp = (export / "model.onnx").stat().st_mtime_ns
    embs, doclens = fp32.encode_documents(texts)
    assert doclens == lens  # the same positions kept (punctuation skiplist, padding)
    assert torch.allclose(embs.float(), reference.float(), atol=2e-3)
    int8 = ColBERTEncoder(str(checkpoint_dir), options, runtime="onnx-int8", models_dir=tmp_path)
    assert (export / "model.onnx").stat().st_mtime_ns == stamp  # exported once, reused
    embs8, doclens8 = int8.encode_documents(texts)
    assert doclens8 == lens
    cosine = (embs8.float() * reference.float()).sum(-1)
    assert float(cosine.min()) > 0.8 and float(cosine.mean()) > 0.97
    dense = ColBERTEncoder(str(checkpoint_dir), options).encode_passages(texts).dense
    assert torch.allclose(fp32.encode_passages(texts).dense.float(), dense.float(), atol=2e-3)
    assert float((int8.encode_passages(texts).dense.float() * dense.float()).sum(-1).min()) > 0.95
    with pytest.raises(ValueError, match="unknown encoder runtime"):
        ColBERTEncoder(str(checkpoint_dir), options, runtime="tensorrt")


@pytest.mark.slow
def test_auto_runtime_is_torch_on_the_cpu_or_the_gpu(checkpoint_dir, tmp_path, monkeypatch):
    from app import service
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "data", checkpoint_dir)
    assert settings.encoder_runtime == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    encoder = service.load_encoder(settings)
    assert encoder.runtime == "torch" and encoder._onnx is None

    built: dict = {}

    class FakeEncoderRecordingItsRuntime:
        def __init__(self, checkpoint, options, runtime, models_dir, device):
            built.update(runtime=runtime, device=device)

        def encode_queries(self, queries):
            return None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(service, "ColBERTEncoder", FakeEncoderRecordingItsRuntime)
    service.load_encoder(settings)
    assert built == {"runtime": "torch", "device": "cuda"}
