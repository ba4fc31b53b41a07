"""Export a ColBERT checkpoint's encoder (transformer + projection) to ONNX.

The server's document encoder can run on onnxruntime instead of torch
(``ENCODER_RUNTIME``): ``model.onnx`` (fp32) and ``model.int8.onnx`` (dynamic
int8 quantization of the weights, per channel) take ``input_ids`` and
``attention_mask`` (dynamic batch and sequence axes) and return the
transformer's last hidden states; the encoder projects, masks and normalises
them as ``ColBERT.doc`` does, and mean-pools them for the dense vector. Any colbert-ai checkpoint works: the export runs on
first start, once per checkpoint, under the models directory (file-locked,
written to a temporary directory and renamed into place), with the same
exporter and quantizer as the hallucination model
(``models/export_hallucination_model.py`` says why not optimum).

    python -m models.export_colbert_onnx CHECKPOINT DEST
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from models.export_hallucination_model import OPSET, _export, quantize_int8
from models.staging import build_once, staged_directory

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
META_FILE = "colbert_onnx.json"
DONE_MARKER = "export.complete"
INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAME = "last_hidden_state"
# Bumped when what the export computes changes, so an older export is not reused.
EXPORT_FORMAT = "hidden-states-1"


def export_dir_name(checkpoint: str) -> str:
    """One directory per checkpoint version: its path (or hub name) and, for
    a local checkpoint, its weights' size and modification time."""
    identity = [checkpoint, EXPORT_FORMAT]
    path = Path(checkpoint)
    if path.is_dir():
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = weights.stat()
            identity.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    return f"colbert-onnx-{path.name or 'checkpoint'}-{digest}"


def _transformer(checkpoint):
    import torch

    class Transformer(torch.nn.Module):
        """The checkpoint's transformer: its last hidden states."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids, attention_mask=attention_mask)[0]

    return Transformer(checkpoint.bert).eval()


def export_checkpoint(checkpoint, source: str, dest: Path) -> Path:
    """Write both ONNX files of a loaded ``Checkpoint`` to ``dest``."""
    dest = Path(dest)
    with staged_directory(dest, DONE_MARKER) as tmp:
        _export(_transformer(checkpoint), checkpoint.raw_tokenizer, INPUT_NAMES, OUTPUT_NAME, tmp / FP32_FILE)
        quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE)
        meta = {
            "source": source,
            "input_names": INPUT_NAMES,
            "output": OUTPUT_NAME,
            "format": EXPORT_FORMAT,
            "opset": OPSET,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return dest


def ensure_colbert_onnx(models_dir: Path, checkpoint, source: str) -> Path:
    """The export of ``checkpoint`` (loaded from ``source``) under ``models_dir``, exporting it once."""
    dest = Path(models_dir) / export_dir_name(source)
    return build_once(dest, DONE_MARKER, lambda: export_checkpoint(checkpoint, source, dest))


def main() -> None:
    from colbert_patches.model_loading import EncoderOptions, load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint, EncoderOptions.for_checkpoint(args.checkpoint))
    print(export_checkpoint(checkpoint, args.checkpoint, args.dest))


if __name__ == "__main__":
    main()
