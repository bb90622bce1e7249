"""ONNX Runtime sessions for evaluation and export: one thread setting, CPU only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def session(path: Path, threads: int = 1) -> Any:
    """A CPU session with ``threads`` intra-op threads (0: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def input_shape(sess: Any) -> tuple[int, int, int]:
    """(C, H, W) of a session's input."""
    _, c, h, w = sess.get_inputs()[0].shape
    return int(c), int(h), int(w)


def predict(path: Path, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class probabilities of the model at ``path`` for float inputs (N, C, H, W)."""
    sess = session(path, threads=0)
    return np.concatenate(
        [sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def predict_images(path: Path, images: Any, batch: int = 1000) -> np.ndarray:
    """Class probabilities for a split's uint8 images (N, C, H, W), read in batches."""
    sess = session(path, threads=0)
    outs = []
    for i in range(0, len(images), batch):
        x = np.asarray(images[i : i + batch], dtype=np.float32) / np.float32(255.0)
        outs.append(sess.run(None, {"input": x})[0])
    return np.concatenate(outs)
