"""Verification in every compile: did the target really get faster, and stay accurate?
With ``--fallback``, ship the better variant when it did not."""
from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backends import Artifact, Backend, Recipe, get_backend
from .calibration import CalibrationSet
from .config import CompileConfig
from .profile import ProfileRequest, profile_model


def verify(cfg: CompileConfig, backend: Backend, evaluation: dict[str, Any], prof: dict[str, Any],
           unpruned_ms: float | None) -> dict[str, Any]:
    """Did the target really get faster, and stay accurate? Each check is stated plainly."""
    on_target = backend.available()[0]
    art, stu = prof["artifact"]["batch1"]["p50_ms"], prof["student"]["batch1"]["p50_ms"]
    loss = evaluation["student"]["accuracy"] - evaluation["artifact"]["accuracy"]
    checks = {
        "faster_than_student": {"ok": art < stu, "artifact_ms": art, "student_fp32_ms": stu,
                                "measured_on": backend.device if on_target else "cpu (ONNX Runtime; not the target)"},
        "accuracy_within_tolerance": {"ok": loss <= cfg.tolerance, "loss": loss, "tolerance": cfg.tolerance},
    }
    if unpruned_ms is not None:
        checks["pruning_pays"] = {"ok": art < unpruned_ms, "pruned_ms": art, "unpruned_ms": unpruned_ms}
    failed = [k for k, v in checks.items() if not v["ok"]]
    return {"ok": not failed, "failed": failed, "checks": checks}


def unpruned_latency(backend: Backend, unpruned: Any, cal: CalibrationSet, recipe: Recipe, work: Path,
                     vocab: int, length: int, cfg: CompileConfig) -> float:
    """Batch-1 latency of the same student built without the sparsity pattern (weights do not
    change latency, so it is not distilled again)."""
    art = backend.compile(unpruned, cal, work / "unpruned", dataclasses.replace(recipe, prune=0.0))
    req = ProfileRequest("onnx", str(art.path / art.model_file), vocab, length, batches=(1,),
                         budget_s=cfg.profile_seconds)
    return profile_model(req)["batch1"]["p50_ms"]


def fall_back(evaluate: Callable[[Any], dict[str, Any]], student: Any, cal: CalibrationSet, recipe: Recipe,
              artifact: Artifact, evaluation: dict[str, Any], prof: dict[str, Any], vocab: int, length: int,
              cfg: CompileConfig) -> tuple[Artifact, dict[str, Any], dict[str, Any]]:
    """--fallback: build the fp32 ONNX Runtime variant of the same student and ship whichever
    of the two is better (accuracy within tolerance first, then batch-1 latency)."""
    fp32 = get_backend("ort-fp32")
    tmp_dir = artifact.path.parent / "model.fp32"
    alt = fp32.compile(student, cal, tmp_dir, recipe)
    alt_eval = evaluate(fp32.load(alt))
    alt_prof = profile_model(ProfileRequest("onnx", str(alt.path / alt.model_file), vocab, length,
                                            budget_s=cfg.profile_seconds))

    def key(ev: dict[str, Any], pr: dict[str, Any]) -> tuple[bool, float]:
        ok = ev["student"]["accuracy"] - ev["artifact"]["accuracy"] <= cfg.tolerance
        return (not ok, pr["batch1"]["p50_ms"])

    new_eval = dict(evaluation, artifact=alt_eval["artifact"])
    new_prof = dict(prof, artifact=alt_prof)
    if key(new_eval, alt_prof) < key(evaluation, prof["artifact"]):
        shutil.rmtree(artifact.path)
        alt.path.rename(artifact.path)
        alt.path = artifact.path
        alt.info["fallback"] = f"kept ort-fp32: the {cfg.target} artifact failed verification and fp32 did better"
        return alt, new_eval, new_prof
    shutil.rmtree(alt.path)
    artifact.info["fallback"] = "kept the target artifact: the fp32 variant was not better"
    return artifact, evaluation, prof
