"""The pipelines a user would otherwise run on the same teacher: built, evaluated and
profiled the same way as fscompile's artifacts, so ratios are computed within one run."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .backends.onnxruntime import OrtInt8Backend, OrtRunner, dynamic_int8, fuse
from .calibration import CalibrationSet
from .data import TaskData
from .evaluate import metrics, predict, torch_runner
from .models.text import TextModel, export_onnx
from .profile import ProfileRequest, profile_model

PEERS = ("teacher PyTorch fp32", "teacher ORT fp32", "teacher ORT dynamic INT8",
         "teacher fused + ORT dynamic INT8", "teacher ORT static INT8")


def _row(name: str, logits: np.ndarray, task: TaskData, ref: np.ndarray, size_mb: float, prof: dict[str, Any],
         build_s: float) -> dict[str, Any]:
    labels = np.array([e.label for e in task.eval])
    return {"system": name, "kind": "peer", **metrics(logits, labels, ref), "size_mb": size_mb,
            "profile": prof, "build_s": build_s}


def build_peers(teacher: TextModel, task: TaskData, cal: CalibrationSet, seq_len: int, budget_s: float,
                real_len: int | None, max_length: int = 128) -> list[dict[str, Any]]:
    """One row per peer pipeline (see :data:`PEERS`)."""
    vocab = teacher.tokenizer.vocab_size
    names = teacher.input_names
    rows = []
    with tempfile.TemporaryDirectory(prefix="fscompile-peers-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        teacher.save_torch(work / "torch")
        t_logits = predict(torch_runner(teacher), teacher.tokenizer, names, task.eval, max_length)
        ref = t_logits.argmax(-1)
        prof = profile_model(ProfileRequest("torch", str(work / "torch"), vocab, seq_len, budget_s=budget_s,
                                            real_len=real_len))
        size = sum(p.stat().st_size for p in (work / "torch").glob("*.safetensors")) / 2**20
        rows.append(_row(PEERS[0], t_logits, task, ref, size, prof, time.perf_counter() - t))

        def onnx_peer(name: str, build) -> None:
            start = time.perf_counter()
            path = build()
            built = time.perf_counter() - start
            logits = predict(OrtRunner(path), teacher.tokenizer, names, task.eval, max_length)
            prof = profile_model(ProfileRequest("onnx", str(path), vocab, seq_len, budget_s=budget_s,
                                                real_len=real_len))
            rows.append(_row(name, logits, task, ref, path.stat().st_size / 2**20, prof, built))

        raw = work / "raw.onnx"

        def export() -> Path:
            export_onnx(teacher, raw)
            return raw

        def fused_dynamic() -> Path:
            fuse(raw, work / "fused.onnx", teacher)
            return dynamic_int8(work / "fused.onnx", work / "fused-int8.onnx", fused=True)

        def static() -> Path:
            OrtInt8Backend._preprocess(raw, work / "pre.onnx")
            OrtInt8Backend._static(work / "pre.onnx", work / "static.onnx", cal, teacher, "minmax")
            return work / "static.onnx"

        onnx_peer(PEERS[1], export)
        onnx_peer(PEERS[2], lambda: dynamic_int8(raw, work / "dyn.onnx", fused=False))
        onnx_peer(PEERS[3], fused_dynamic)
        onnx_peer(PEERS[4], static)
    return rows
