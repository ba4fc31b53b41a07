"""Runners for the hallucination scorer's model: one batch of token ids in,
the model's single output out, as numpy (int8 ONNX in the server, fp32 torch
as the reference it is measured against), and the batching they are fed by."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from app.engine.encoder import length_batches as batch_by_length

# Windows are sorted by length and batched up to this many padded tokens, so
# short sentences are not padded to the length of a passage.
BATCH_TOKENS = 4096

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


class OnnxRunner:
    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle workers sleep instead of spinning: the CPU is shared with the
        # ColBERT searches and the LM, and spinning costs them more than it saves here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: feeds[name] for name in self.input_names})[0]


class TorchRunner:
    """The same model in fp32 torch (the reference the int8 file is measured against)."""

    def __init__(self, module, input_names: Sequence[str]):
        self.module = module.eval()
        self.input_names = list(input_names)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(*(torch.from_numpy(feeds[name]) for name in self.input_names)).numpy()


def pad_rows(rows: list[dict[str, list[int]]], names: Sequence[str], pad_id: int) -> dict[str, np.ndarray]:
    width = max(len(r["input_ids"]) for r in rows)
    feeds = {}
    for name in names:
        fill = pad_id if name == "input_ids" else 0
        feeds[name] = np.array([r[name] + [fill] * (width - len(r[name])) for r in rows], dtype=np.int64)
    return feeds


def length_batches(rows: list[dict[str, list[int]]]) -> list[list[int]]:
    """Row indices sorted by length, cut into batches of at most BATCH_TOKENS padded tokens."""
    return batch_by_length([len(r["input_ids"]) for r in rows], BATCH_TOKENS)
