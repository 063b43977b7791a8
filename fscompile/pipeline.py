"""The compile pipeline, one stage per function, data flowing one way (see DESIGN.md):

    resolve teacher -> load data -> adapt (headless teacher) -> derive student -> prepare
    (target sparsity) -> distill -> compile (calibrated INT8) -> evaluate + profile -> report
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapt import fit_head
from .augment import TransferSet, build_transfer_set, vocabulary_words
from .backends import Artifact, Backend, Recipe, get_backend
from .calibration import CalibrationSet, batches_from_encodings
from .config import CompileConfig
from .data import Example, TaskData, load_task_data, load_unlabeled
from .distill import DistillStats, distill, set_seed
from .errors import InputError, TargetUnavailable
from .evaluate import metrics, predict
from .models.text import (TextModel, align_labels, derive_student, factorize_embeddings, load_teacher,
                          save_torch)
from .outdir import MANIFEST, check_out, staged
from .profile import ProfileRequest, device_info, profile_model
from .report import render_markdown, write_json

# progress(stage, done, total, detail): the CLI draws bars, the API may pass None.
Progress = Callable[[str, int, int, str], None]


def _noop(stage: str, done: int, total: int, detail: str = "") -> None:
    pass


def resolve_backend(cfg: CompileConfig) -> Backend:
    """The target's backend, refusing now (before any work) when it cannot run here."""
    backend = get_backend(cfg.target)
    ok, why = backend.available()
    if not ok:
        raise TargetUnavailable(f"target {cfg.target!r} is not available here: {why}")
    return backend


def load_data(cfg: CompileConfig) -> TaskData:
    return load_task_data(cfg.data, cfg.shots, cfg.seed, text_column=cfg.text_column,
                          text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
                          max_eval=cfg.max_eval)


def to_teacher_labels(task: TaskData, teacher: TextModel) -> TaskData:
    """Re-express the data's labels in the teacher's label order (by name or index)."""
    mapping = align_labels(teacher, task.label_names)
    if mapping is None:  # headless teacher: its new head follows the data's labels
        return task

    def remap(ex: list[Example]) -> list[Example]:
        return [dataclasses.replace(e, label=mapping[e.label]) for e in ex]

    return dataclasses.replace(task, shots=remap(task.shots), eval=remap(task.eval),
                               label_names=list(teacher.label_names))


def adapt(teacher: TextModel, task: TaskData, cfg: CompileConfig) -> dict[str, Any] | None:
    """Give a headless teacher a task head fitted on the shots (None when it has one)."""
    if teacher.has_head:
        return None
    return fit_head(teacher, task.shots, cfg.seed)


def transfer_set(task: TaskData, teacher: TextModel, cfg: CompileConfig) -> TransferSet:
    unlabeled = load_unlabeled(cfg.distill.unlabeled) if cfg.distill.unlabeled else None
    mask = teacher.tokenizer.mask_token or teacher.tokenizer.unk_token or "[MASK]"
    ops = tuple(cfg.distill.ops.split(","))
    return build_transfer_set(task.shots, cfg.distill.augment, cfg.seed, mask, unlabeled, ops,
                              vocabulary_words(teacher.tokenizer))


def validation_set(task: TaskData, teacher: TextModel, cfg: CompileConfig, size: int = 256) -> TransferSet:
    """Fresh variants of the shots (another seed, never trained on) for early stopping."""
    mask = teacher.tokenizer.mask_token or teacher.tokenizer.unk_token or "[MASK]"
    per_shot = max(1, -(-size // len(task.shots)))
    ts = build_transfer_set(task.shots, per_shot, cfg.seed + 7919, mask, None,
                            tuple(cfg.distill.ops.split(",")), vocabulary_words(teacher.tokenizer))
    n = len(task.shots)  # drop the raw shots: the student trains on those
    return TransferSet(ts.texts[n:], ts.pairs[n:] if ts.pairs is not None else None, ts.origin[n:])


def calibration_set(student: TextModel, transfer: TransferSet, cfg: CompileConfig,
                    n_calibrate: int = 256, n_validate: int = 256) -> CalibrationSet:
    """Calibrate on the shots plus augmented variants; hold out other variants for choosing."""
    rng = np.random.default_rng(cfg.seed + 1)
    n_shots = transfer.origin.count("shot")
    rest = rng.permutation(np.arange(n_shots, len(transfer))).tolist()
    take = max(0, min(n_calibrate - n_shots, len(rest) // 2))  # always leave variants to validate on
    cal = list(range(n_shots)) + rest[:take]
    val = rest[take:take + n_validate] or cal

    def batches(idx: list[int]):
        texts = [transfer.texts[i] for i in idx]
        pairs = [transfer.pairs[i] for i in idx] if transfer.pairs is not None else None
        enc = student.tokenizer(texts, pairs, truncation=True, max_length=cfg.distill.max_length)
        return batches_from_encodings(enc, student.input_names, student.tokenizer.pad_token_id or 0)

    return CalibrationSet(calibrate=batches(cal), validate=batches(val))


def torch_runner(model: TextModel):
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model.module(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()
    return run


def evaluate_all(task: TaskData, teacher: TextModel, student: TextModel, artifact_runner,
                 max_length: int) -> dict[str, dict[str, float]]:
    """Accuracy, macro-F1 and agreement with the teacher on the eval split."""
    labels = np.array([e.label for e in task.eval])
    names = student.input_names
    t_logits = predict(torch_runner(teacher), teacher.tokenizer, names, task.eval, max_length)
    t_pred = t_logits.argmax(-1)
    out = {"teacher": metrics(t_logits, labels, t_pred)}
    out["student"] = metrics(predict(torch_runner(student), student.tokenizer, names, task.eval, max_length),
                             labels, t_pred)
    out["artifact"] = metrics(predict(artifact_runner, student.tokenizer, names, task.eval, max_length),
                              labels, t_pred)
    return out


def profile_all(teacher_dir: Path, student_dir: Path, artifact: Artifact, vocab: int,
                seq_len: int, budget_s: float) -> dict[str, dict[str, Any]]:
    """Latency and peak memory of each model, each in a fresh process."""
    models = {"teacher": ("torch", teacher_dir), "student": ("torch", student_dir),
              "artifact": ("onnx", artifact.path / artifact.model_file)}
    return {name: profile_model(ProfileRequest(kind, str(path), vocab, seq_len, budget_s=budget_s))
            for name, (kind, path) in models.items()}


def _dir_mb(path: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in path.glob(pattern)) / 2**20


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str, progress: Progress) -> Iterator[None]:
    progress(name, 0, 1, "")
    t = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t, 2)
    progress(name, 1, 1, "")


def run(cfg: CompileConfig, out: Path, *, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Compile ``cfg`` into ``out`` and return the manifest. Nothing is written on failure."""
    progress = progress or _noop
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out)
    check_out(out, cfg.fingerprint(), force)
    backend = resolve_backend(cfg)
    set_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with _timed(timings, "load data", progress):
        task = load_data(cfg)
    with _timed(timings, "load teacher", progress):
        teacher = load_teacher(cfg.teacher, task.label_names, trust_remote_code=cfg.trust_remote_code)
        task = to_teacher_labels(task, teacher)
    with _timed(timings, "adapt teacher", progress):
        adaptation = adapt(teacher, task, cfg)
    with _timed(timings, "derive student", progress):
        student, keep = derive_student(teacher, cfg.student_layers)
        if cfg.embedding_rank:
            student.info["embeddings"] = factorize_embeddings(student, cfg.embedding_rank)
        recipe = Recipe(prune=cfg.prune, seed=cfg.seed, seq_len=cfg.seq_len, calibration=cfg.calibration)
        # The target's sparsity pattern is applied before distillation, which then serves as recovery.
        student = backend.prepare(student, recipe)
    with _timed(timings, "distill", progress):
        transfer = transfer_set(task, teacher, cfg)
        validation = validation_set(task, teacher, cfg) if cfg.distill.evals else None
        stats: DistillStats = distill(
            teacher, student, transfer, keep, cfg.distill, cfg.seed,
            progress=lambda d, t, loss: progress("distill", d, t, f"loss {loss:.4f}"), validation=validation)

    with staged(out) as stage, tempfile.TemporaryDirectory(prefix="fscompile-work-") as work_s:
        work = Path(work_s)
        with _timed(timings, "compile", progress):
            cal = calibration_set(student, transfer, cfg)
            artifact = backend.compile(student, cal, stage / "model", recipe)
        with _timed(timings, "evaluate", progress):
            evaluation = evaluate_all(task, teacher, student, backend.load(artifact), cfg.distill.max_length)
        with _timed(timings, "profile", progress):
            save_torch(teacher, work / "teacher")
            save_torch(student, work / "student")
            prof = profile_all(work / "teacher", work / "student", artifact, teacher.tokenizer.vocab_size,
                               cfg.seq_len, cfg.profile_seconds)
        sizes = {"teacher": _dir_mb(work / "teacher", "*.safetensors"),
                 "student": _dir_mb(work / "student", "*.safetensors"),
                 "artifact": _dir_mb(artifact.path, "*.onnx")}
        params = {"teacher": teacher.num_parameters(), "student": student.num_parameters(),
                  "artifact": student.num_parameters()}
        timings["total"] = round(time.perf_counter() - start, 2)
        manifest = {
            "fscompile_version": _version(),
            "fingerprint": cfg.fingerprint(),
            "config": cfg.to_dict(),
            "target": {"name": backend.name, "device": backend.device, "precision": artifact.precision},
            "teacher": {**teacher.info, "source": teacher.source, "label_names": teacher.label_names,
                        "adaptation": adaptation},
            "data": {"source": task.source, "columns": task.columns, "label_names": task.label_names,
                     "shot_split": task.shot_split, "shot_indices": task.shot_indices,
                     "shots_per_class": cfg.shots, "eval_split": task.eval_split, "eval_rows": len(task.eval)},
            "student": {"layers_kept": keep, "prepare": student.info.get("prepare"),
                        "embeddings": student.info.get("embeddings"), "parameters": params["student"]},
            "distillation": {**dataclasses.asdict(stats),
                             "transfer_origin": {o: transfer.origin.count(o) for o in sorted(set(transfer.origin))}},
            "artifact": {"dir": "model", "model_file": artifact.model_file, **artifact.info},
            "metrics": evaluation,
            "profile": prof,
            "size_mb": sizes,
            "parameters": params,
            "compression": {"size_ratio_vs_teacher": sizes["teacher"] / sizes["artifact"],
                            "parameter_ratio_vs_teacher": params["teacher"] / params["student"]},
            "device": device_info(),
            "timings_s": timings,
        }
        write_json(stage / MANIFEST, manifest)
        (stage / "report.md").write_text(render_markdown(manifest))
    manifest["out_dir"] = str(out.resolve())
    return manifest


def _version() -> str:
    from . import __version__

    return __version__
