"""Prepare every default model the server uses into one models directory.

The Docker image runs ``python -m models.prepare --models-dir /opt/models`` in
its builder stage, so the server starts with no download and no build; a
server without prepared models builds them on first start instead.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from app.settings import Settings
from models.build_default_checkpoint import ensure_default_checkpoint


def colbert_default_checkpoint(settings: Settings) -> Path:
    return ensure_default_checkpoint(settings.default_checkpoint_dir)


def colbert_onnx_export(settings: Settings) -> Path:
    """The default checkpoint's ONNX export (the document encoder's CPU runtime)."""
    from colbert_patches.model_loading import EncoderOptions, load_checkpoint
    from models.export_colbert_onnx import ensure_colbert_onnx

    source = str(ensure_default_checkpoint(settings.default_checkpoint_dir))
    checkpoint = load_checkpoint(source, EncoderOptions.for_checkpoint(source), device="cpu")
    return ensure_colbert_onnx(settings.models_dir, checkpoint, source)


def answer_lm(settings: Settings) -> Path:
    from models.convert_answer_lm import ensure_answer_lm

    return ensure_answer_lm(settings.models_dir)


def hallucination_model(settings: Settings) -> Path:
    from models.export_hallucination_model import ensure_hallucination_model

    return ensure_hallucination_model(settings.models_dir)


# ---------------------------------------------------------------------------
# Preparation steps, run in this order. To add a model, append
# ("name", function): the function takes the Settings (``settings.models_dir``
# is the target directory), builds or exports its model under it, returns the
# path, needs no network, and does nothing when its model is already complete.
PREPARATION_STEPS: list[tuple[str, Callable[[Settings], Path]]] = [
    ("colbert-minilm-l6", colbert_default_checkpoint),
    ("colbert-minilm-l6-onnx", colbert_onnx_export),
    ("smollm2-135m-instruct", answer_lm),
    ("hallucination-minilm-l6", hallucination_model),
]
# ---------------------------------------------------------------------------


def prepare(models_dir: Path) -> dict[str, Path]:
    settings = Settings(_env_file=None, models_dir=models_dir)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    done = {}
    for name, step in PREPARATION_STEPS:
        started = time.monotonic()
        done[name] = step(settings)
        print(f"{name}: {done[name]} ({time.monotonic() - started:.1f}s)", flush=True)
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True, help="directory to prepare the models in")
    args = parser.parse_args(argv)
    prepare(args.models_dir)


if __name__ == "__main__":
    main()
