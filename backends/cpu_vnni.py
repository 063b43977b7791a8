"""``cpu-vnni``: INT8 for x86 CPUs with VNNI / AMX, through ONNX Runtime.

Neural Compressor 3.10 quantizes PyTorch models only (its ONNX API is gone), so this target
builds on ONNX Runtime: attention fused by ORT's transformer optimizer, weights INT8
per-channel, activations quantized dynamically, and the graph optimised offline at
``ORT_ENABLE_EXTENDED`` for this runtime (MatMulInteger + scale fusions that feed the
VNNI ``vpdpbusd`` / AMX ``tdpbusd`` kernels). On a CPU without VNNI the u8 x s8 products can
overflow 16-bit intermediates (``vpmaddubsw``), so it quantizes with ``reduce_range`` (7-bit
weights) and warns about the accuracy risk.
"""
from __future__ import annotations

import platform
import tempfile
import warnings
from pathlib import Path

from ..calibration import CalibrationSet
from ..models.text import TextModel
from . import Artifact, Recipe
from .onnxruntime import MODEL_FILE, _OrtBackend, dynamic_int8, vnni_flags


class CpuVnniBackend(_OrtBackend):
    """INT8 tuned for VNNI/AMX CPUs (ONNX Runtime, fused attention, offline-optimised graph)."""

    name = "cpu-vnni"
    precisions = ("int8",)
    description = "x86 INT8 for VNNI/AMX: fused attention, per-channel INT8, ORT graph optimised offline"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
            return False, f"not an x86 CPU ({platform.machine()})"
        return True, ""

    def compile(self, student: TextModel, calibration: CalibrationSet, out_dir: Path,
                recipe: Recipe) -> Artifact:
        import onnxruntime as ort

        flags = vnni_flags()
        has_vnni = any(flags.values())
        if not has_vnni:
            warnings.warn("this CPU has no VNNI/AMX: INT8 is quantized with reduce_range (7-bit weights) "
                          "to avoid u8s8 overflow; expect lower accuracy and less speed-up", stacklevel=2)
        with tempfile.TemporaryDirectory(prefix="fscompile-vnni-") as tmp:
            work = Path(tmp)
            _, fused, info = self._export(student, work, recipe)
            q = work / "int8.onnx"
            dynamic_int8(self._embeddings(fused, recipe), q, fused=True, reduce_range=not has_vnni)
            opt = work / MODEL_FILE
            so = ort.SessionOptions()
            # EXTENDED (not ALL): ALL adds layout transforms tied to this exact CPU; EXTENDED
            # fusions are portable across x86 CPUs with the same ONNX Runtime version.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = str(opt)
            ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
            info.update({"isa": flags, "reduce_range": not has_vnni,
                         "graph": f"ORT_ENABLE_EXTENDED, onnxruntime {ort.__version__}"})
            return self._finish(student, opt, out_dir, "int8", info)
