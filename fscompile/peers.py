"""The pipelines a user would otherwise run on the same teacher: built, evaluated and
profiled the same way as fscompile's artifacts, so ratios are computed within one run."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from .backends.onnxruntime import OrtInt8Backend, OrtRunner, dynamic_int8, fuse
from .calibration import CalibrationSet
from .config import CompileConfig
from .profile import ProfileRequest, profile_model
from .tasks import Distilled, TaskAdapter

PEERS = ("teacher PyTorch fp32", "teacher ORT fp32", "teacher ORT dynamic INT8",
         "teacher fused + ORT dynamic INT8", "teacher ORT static INT8")


def _row(name: str, scores: dict[str, Any], size_mb: float, prof: dict[str, Any], build_s: float) -> dict[str, Any]:
    return {"system": name, "kind": "peer", **scores, "size_mb": size_mb, "profile": prof, "build_s": build_s}


def build_peers(d: Distilled, adapter: TaskAdapter, cal: CalibrationSet, cfg: CompileConfig) -> list[dict[str, Any]]:
    """One row per peer pipeline (see :data:`PEERS`; the fused one only where ORT's transformer
    optimizer applies)."""
    teacher = d.teacher
    vocab, length, real_len = adapter.input_size(d, cfg)
    budget = cfg.profile_seconds
    rows = []
    with tempfile.TemporaryDirectory(prefix="fscompile-peers-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        teacher.save_torch(work / "torch")
        ref = adapter.predictions(d, None, teacher)
        prof = profile_model(ProfileRequest("torch", str(work / "torch"), vocab, length, budget_s=budget,
                                            real_len=real_len))
        size = sum(p.stat().st_size for p in (work / "torch").glob("*.safetensors")) / 2**20
        rows.append(_row(PEERS[0], adapter.score(d, ref, ref), size, prof, time.perf_counter() - t))

        def onnx_peer(name: str, build) -> None:
            start = time.perf_counter()
            path = build()
            built = time.perf_counter() - start
            scores = adapter.score(d, adapter.predictions(d, OrtRunner(path), teacher), ref)
            prof = profile_model(ProfileRequest("onnx", str(path), vocab, length, budget_s=budget, real_len=real_len))
            rows.append(_row(name, scores, path.stat().st_size / 2**20, prof, built))

        raw = work / "raw.onnx"

        def export() -> Path:
            teacher.export_onnx(raw)
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
        if teacher.fusion:
            onnx_peer(PEERS[3], fused_dynamic)
        onnx_peer(PEERS[4], static)
    return rows
