"""The compile, for any task, one stage per function, data flowing one way (see DESIGN.md):

    resolve target -> [task: load data -> resolve teacher -> adapt -> derive student -> prepare
    (target sparsity) -> distill] -> compile (calibrated INT8) -> evaluate + profile -> verify -> write

The bracketed stages are the task's own (``fscompile.tasks``, one adapter per task); this module
knows a task only through the adapter protocol.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .backends import Artifact, Backend, get_backend
from .config import CompileConfig
from .errors import StageError, TargetUnavailable
from .memory import record, row_from_manifest
from .models.base import weights_sha256
from .outdir import MANIFEST, check_out, check_space, dir_mb, locked, staged
from .profile import device_info, peak_rss_mb, profile_all
from .report import render_markdown, write_json
from .tasks import Distilled, Progress, TaskAdapter, get_task, timed
from .verify import fall_back, unpruned_latency, verify


def _noop(stage: str, done: int, total: int, detail: str = "") -> None:
    pass


def resolve_backend(cfg: CompileConfig) -> Backend:
    """The target's backend, refusing now (before any work) when it cannot run here, unless
    ``export_only`` asks for the portable files alone."""
    backend = get_backend(cfg.target)
    ok, why = backend.available()
    if not ok and not cfg.export_only:
        raise TargetUnavailable(f"target {cfg.target!r} is not available here: {why} "
                                "(--export-only builds its portable files without running it)")
    return backend


def teacher_weights(spec: str, weights: str | None) -> list[Path]:
    """The teacher's weight files where they are on disk (a local directory, ``--weights``, a
    ``.gguf``); none for a Hub id or an architecture name."""
    files = [Path(weights)] if weights else []
    p = Path(spec).expanduser()
    if p.is_dir():
        files += [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")]
    elif p.suffix == ".gguf":
        files.append(p)
    return files


def distill_stage(cfg: CompileConfig, backend: Backend | None, progress: Progress) -> Distilled:
    """Load, adapt, derive, (apply ``backend``'s sparsity pattern), distill: the task's way."""
    return get_task(cfg).distill_stage(cfg, backend, progress)


def retarget(d: Distilled, backend: Backend, cfg: CompileConfig, recovery_steps: int,
             progress: Progress) -> Distilled:
    """A target-agnostic distilled student made ready for ``backend`` (its sparsity pattern and a
    short recovery, where the task does that): one distillation serves many targets."""
    return get_task(cfg).retarget(d, backend, cfg, recovery_steps, progress)


def build(d: Distilled, backend: Backend, cfg: CompileConfig, out: Path, progress: Progress,
          start: float) -> dict[str, Any]:
    """Compile, evaluate, profile and verify into ``out``; returns the manifest (also written)."""
    adapter = get_task(cfg)
    timings = dict(d.timings)
    recipe = cfg.recipe()
    with tempfile.TemporaryDirectory(prefix="fscompile-work-") as work_s:
        work = Path(work_s)
        with timed(timings, "compile", progress):
            cal = adapter.calibration(d, cfg)
            artifact = backend.compile(d.student, cal, out / "model", recipe)
        with timed(timings, "evaluate", progress):
            evaluation = adapter.evaluate(d, backend.load(artifact), cfg)
        vocab, length, real_len = adapter.input_size(d, cfg)
        with timed(timings, "profile", progress):
            d.teacher.save_torch(work / "teacher")
            d.student.save_torch(work / "student")
            prof = profile_all(work / "teacher", work / "student", artifact.path / artifact.model_file, vocab, length,
                               cfg.profile_seconds, real_len)
        with timed(timings, "verify", progress):
            # the unpruned twin only needs the kept INT8 variant: latency does not depend on calibration
            twin = dataclasses.replace(recipe, variant=artifact.info.get("variant"))
            unpruned_ms = (unpruned_latency(backend, d.unpruned, cal, twin, work, vocab, length, cfg)
                           if d.unpruned is not None and backend.available()[0] else None)
            verification = verify(cfg, backend, evaluation, prof, unpruned_ms)
            if cfg.fallback and not verification["ok"]:
                artifact, evaluation, prof = fall_back(lambda run: adapter.evaluate(d, run, cfg), d.student, cal,
                                                       recipe, artifact, evaluation, prof, vocab, length, cfg)
                verification["fallback"] = artifact.info.get("fallback")
        sizes = {"teacher": dir_mb(work / "teacher", "model.*"),  # .safetensors, or .pt2 for a user's module
                 "student": dir_mb(work / "student", "model.*"),
                 "artifact": dir_mb(artifact.path, "*.onnx")}
    timings["total"] = round(time.perf_counter() - start, 2)
    manifest = _manifest(d, adapter, backend, cfg, artifact, evaluation, verification, prof, sizes,
                         (length, real_len), timings)
    write_json(out / MANIFEST, manifest)
    (out / "report.md").write_text(render_markdown(manifest))
    record(row_from_manifest(manifest))  # what the budget search learns from
    return manifest


def _manifest(d: Distilled, adapter: TaskAdapter, backend: Backend, cfg: CompileConfig, artifact: Artifact,
              evaluation: dict[str, Any], verification: dict[str, Any], prof: dict[str, Any],
              sizes: dict[str, float], lengths: tuple[int, int | None], timings: dict[str, float]) -> dict[str, Any]:
    """The machine-readable record of one build (``manifest.json``; ``report.md`` renders it)."""
    task, teacher, student = d.task, d.teacher, d.student
    params = {"teacher": teacher.num_parameters(), "student": student.num_parameters(),
              "artifact": student.num_parameters()}
    transfer = d.transfer.origin if d.transfer is not None else []
    loaded = getattr(task, "info", None) or {}  # rows left out and labels folded at load; not every task data has them
    return {
        "fscompile_version": version("fscompile"),
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "task": adapter.name,
        "target": {"name": backend.name, "device": backend.device, "precision": artifact.precision,
                   "export_only": cfg.export_only and not backend.available()[0]},
        "teacher": {**{k: v for k, v in teacher.info.items() if k != "masks"}, "source": teacher.source,
                    "label_names": teacher.label_names, "adaptation": d.adaptation},
        "data": {"source": task.source, "columns": task.columns, "label_names": task.label_names,
                 "shot_split": task.shot_split, "shot_indices": task.shot_indices,
                 "shots_per_class": cfg.shots, "eval_split": task.eval_split, "eval_rows": len(task.eval),
                 "input_length": lengths[0], "real_seq_len": lengths[1],
                 # rows left out (empty text, evaluation rows repeating a shot) and labels folded by case
                 "dropped": loaded.get("dropped") or {}, "labels_merged": loaded.get("labels_merged") or {}},
        "student": {"architecture": getattr(student, "arch", None), "layers_kept": d.keep,
                    "teacher_layers": student.info.get("teacher_layers"),
                    "prepare": student.info.get("prepare"), "weights_sha256": weights_sha256(student),
                    "embeddings": student.info.get("embeddings"),
                    "layer_selection": student.info.get("layer_selection"), "parameters": params["student"]},
        "distillation": {**dataclasses.asdict(d.stats), "sources": d.sources,
                         "transfer_origin": {o: transfer.count(o) for o in sorted(set(transfer))}},
        "artifact": {"dir": "model", "model_file": artifact.model_file, **artifact.info},
        "metrics": evaluation,
        "verification": verification,
        "profile": prof,
        "size_mb": sizes,
        "parameters": params,
        "compression": {"size_ratio_vs_teacher": sizes["teacher"] / sizes["artifact"],
                        "parameter_ratio_vs_teacher": params["teacher"] / params["student"]},
        "device": device_info(),
        "compile_peak_rss_mb": peak_rss_mb(),
        "timings_s": timings,
    }


@contextlib.contextmanager
def named_stage_errors(current: list[str]) -> Iterator[None]:
    """A stage failure names the stage it happened in and says that nothing was written (the
    staging directory is gone by then): "profile: ... ; nothing was written"."""
    try:
        yield
    except StageError as e:
        said = "nothing was written" in str(e)
        raise StageError(f"{current[0]}: {e}{'' if said else '; nothing was written'}") from e


def run(cfg: CompileConfig, out: Path, *, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Compile ``cfg`` into ``out`` and return the manifest. Nothing is written on failure."""
    progress = progress or _noop
    start = time.perf_counter()
    out = Path(out)
    check_out(out, cfg.fingerprint(), force)
    check_space(out, teacher_weights(cfg.teacher, cfg.weights))
    current = ["start"]

    def track(stage: str, done: int, total: int, detail: str = "") -> None:
        if done == 0:
            current[0] = stage
        progress(stage, done, total, detail)

    with locked(out), named_stage_errors(current):
        backend = resolve_backend(cfg)
        d = distill_stage(cfg, backend, track)
        with staged(out) as stage:
            manifest = build(d, backend, cfg, stage, track, start)
    if d.checkpoint is not None:  # the run landed: its resume point is no longer needed
        shutil.rmtree(d.checkpoint, ignore_errors=True)
    manifest["out_dir"] = str(out.resolve())
    return manifest
