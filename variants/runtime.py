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


def predict(path: Path, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class probabilities of the model at ``path`` for inputs (N, 1, 28, 28)."""
    sess = session(path, threads=0)
    return np.concatenate(
        [sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )
