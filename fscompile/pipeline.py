"""The compile pipeline, one stage per function, data flowing one way (see DESIGN.md):

    resolve teacher -> load data -> adapt (headless teacher) -> derive student -> prepare
    (target sparsity) -> distill -> compile (calibrated INT8) -> evaluate + profile -> report
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .adapt import fit_head
from .augment import (
    Lexicon,
    TransferSet,
    build_transfer_set,
    nearest_words,
    vocabulary_words,
)
from .backends import Backend, Recipe, get_backend
from .calibration import CalibrationSet, batches_from_encodings
from .checkpoint import checkpoint_dir, resume_or_distill
from .config import CompileConfig
from .data import Example, TaskData, load_task_data, load_unlabeled
from .distill import distill, set_seed
from .errors import TargetUnavailable
from .evaluate import evaluate_all, metrics, predict, real_seq_len, torch_runner
from .models.text import (
    TextModel,
    align_labels,
    derive_student,
    factorize_embeddings,
    load_teacher,
    parse_layers,
    select_layers,
    weights_sha256,
)
from .outdir import MANIFEST, check_out, staged
from .profile import device_info, peak_rss_mb, profile_all
from .report import render_markdown, write_json
from .tasks import Distilled, Progress, get_task, timed
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


def _grow(task: TaskData, teacher: TextModel, cfg: CompileConfig, per_shot: int, seed: int,
          unlabeled: list[str] | None = None) -> TransferSet:
    """The shots plus ``per_shot`` augmented variants each, with the configured augmentations."""
    mask = teacher.tokenizer.mask_token or teacher.tokenizer.unk_token or "[MASK]"
    return build_transfer_set(task.shots, per_shot, seed, mask, unlabeled, tuple(cfg.distill.ops.split(",")),
                              lexicon(task, teacher))


def lexicon(task: TaskData, teacher: TextModel) -> Lexicon:
    """The teacher's vocabulary words and, for the shots' words, their embedding neighbours."""
    words = vocabulary_words(teacher.tokenizer)
    seen = {w for s in task.shots for t in (s.text, s.text_pair or "") for w in t.split()}
    table = teacher.module.base.get_input_embeddings().weight
    return Lexicon(words, nearest_words(teacher.tokenizer, table, seen, words))


def transfer_set(task: TaskData, teacher: TextModel, cfg: CompileConfig) -> TransferSet:
    unlabeled = None
    if cfg.distill.unlabeled:
        # more texts than the distillation steps can show is teacher time spent for nothing
        unlabeled = load_unlabeled(cfg.distill.unlabeled, task.eval + task.shots,
                                   cfg.distill.steps * cfg.distill.batch_size, cfg.seed)
    return _grow(task, teacher, cfg, cfg.distill.augment, cfg.seed, unlabeled)


def choose_layers(teacher: TextModel, transfer: TransferSet, cfg: CompileConfig,
                  probe_size: int = 256) -> tuple[list[int], list[dict[str, Any]] | None]:
    """The teacher layers the student keeps: as given, or chosen by measured effect on a
    probe drawn from the transfer set (the teacher's outputs are the target, no labels)."""
    plan = parse_layers(cfg.student_layers, len(teacher.layers()))
    if isinstance(plan, list):
        return plan, None
    rng = np.random.default_rng(cfg.seed + 2)
    idx = sorted(rng.choice(len(transfer), size=min(probe_size, len(transfer)), replace=False).tolist())
    texts = [transfer.texts[i] for i in idx]
    pairs = [transfer.pairs[i] for i in idx] if transfer.pairs is not None else None
    probe = teacher.encode(texts, pairs, max_length=cfg.distill.max_length)
    return select_layers(teacher, plan, probe)


def hold_out_unlabeled(transfer: TransferSet, seed: int, size: int = 256) -> tuple[TransferSet, TransferSet | None]:
    """With --unlabeled text, a quarter of it (at most ``size`` texts) set apart for early
    stopping, as the QA task does with its question pool: agreement on fresh variants of the
    shots saturates near 98% and says little about real inputs; held-out real text does.
    Returns (the transfer set without them, the held-out texts or None)."""
    pool = [i for i, o in enumerate(transfer.origin) if o == "unlabeled"]
    k = min(size, len(pool) // 4)
    if not k:
        return transfer, None
    held = set(np.random.default_rng(seed + 7919).choice(pool, k, replace=False).tolist())

    def take(idx: list[int]) -> TransferSet:
        pairs = [transfer.pairs[i] for i in idx] if transfer.pairs is not None else None
        return TransferSet([transfer.texts[i] for i in idx], pairs, [transfer.origin[i] for i in idx])

    return (take([i for i in range(len(transfer)) if i not in held]), take(sorted(held)))


def validation_set(task: TaskData, teacher: TextModel, cfg: CompileConfig, size: int = 256) -> TransferSet:
    """Fresh variants of the shots (another seed, never trained on) for early stopping."""
    ts = _grow(task, teacher, cfg, max(1, -(-size // len(task.shots))), cfg.seed + 7919)
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


def _dir_mb(path: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in path.glob(pattern)) / 2**20


def distill_stage(cfg: CompileConfig, backend: Backend | None, progress: Progress) -> Distilled:
    """Load, adapt, derive, (apply ``backend``'s sparsity pattern), distill: the task's way."""
    return get_task(cfg).distill_stage(cfg, backend, progress)


def text_distill_stage(cfg: CompileConfig, backend: Backend | None, progress: Progress) -> Distilled:
    """Text classification: transfer set, layer choice, derived student, KD + hidden matching."""
    timings: dict[str, float] = {}
    set_seed(cfg.seed)
    with timed(timings, "load data", progress):
        task = load_data(cfg)
    with timed(timings, "load teacher", progress):
        teacher = load_teacher(cfg.teacher, task.label_names, trust_remote_code=cfg.trust_remote_code)
        task = to_teacher_labels(task, teacher)
    with timed(timings, "adapt teacher", progress):
        adaptation = adapt(teacher, task, cfg)
    unpruned = None
    with timed(timings, "derive student", progress):
        transfer, held = hold_out_unlabeled(transfer_set(task, teacher, cfg), cfg.seed, 256 if cfg.distill.evals else 0)
        keep, selection = choose_layers(teacher, transfer, cfg)
        student, keep = derive_student(teacher, keep)
        student.info["layer_selection"] = selection
        if cfg.embedding_rank:
            student.info["embeddings"] = factorize_embeddings(student, cfg.embedding_rank)
        if backend is not None:
            # The sparsity pattern goes in before distillation, which then serves as recovery.
            unpruned = copy.deepcopy(student) if cfg.prune > 0 else None
            student = backend.prepare(student, _recipe(cfg))
    ckpt = checkpoint_dir(cfg, backend)
    with timed(timings, "distill", progress):
        student, stats = resume_or_distill(ckpt, student, progress, lambda: distill(
            teacher, student, transfer, keep, cfg.distill, cfg.seed,
            validation=(held or validation_set(task, teacher, cfg)) if cfg.distill.evals else None,
            progress=lambda d, t, loss: progress("distill", d, t, f"loss {loss:.4f}")))
    return Distilled(task, teacher, student, keep, transfer, stats, adaptation, unpruned, timings, ckpt,
                     "text-classification")


def retarget(d: Distilled, backend: Backend, cfg: CompileConfig, recovery_steps: int,
             progress: Progress) -> Distilled:
    """A copy of a target-agnostic distilled student with ``backend``'s sparsity pattern and a
    short recovery distillation (masks fixed): one distillation serves many targets."""
    if cfg.prune <= 0 or d.kind not in ("text-classification", "image-classification"):
        return d  # QA and generation students: pruned in their own compile only
    student = backend.prepare(copy.deepcopy(d.student), _recipe(cfg))
    timings = dict(d.timings)
    with timed(timings, "recover", progress):
        rcfg = dataclasses.replace(cfg.distill, steps=recovery_steps, evals=0)
        if d.kind == "image-classification":
            from .tasks.vision import distill_images

            distill_images(d.teacher, student, d.task, rcfg, cfg.seed)
        else:
            distill(d.teacher, student, d.transfer, d.keep, rcfg, cfg.seed)
    return dataclasses.replace(d, student=student, unpruned=d.student, timings=timings)


def _recipe(cfg: CompileConfig) -> Recipe:
    return Recipe(prune=cfg.prune, prune_heads=cfg.prune_heads, seed=cfg.seed, seq_len=cfg.seq_len, calibration=cfg.calibration,
                  embedding_bits=cfg.embedding_bits)


def build(d: Distilled, backend: Backend, cfg: CompileConfig, out: Path, progress: Progress,
          start: float) -> dict[str, Any]:
    """Compile, evaluate, profile and verify into ``out``; returns the manifest (also written)."""
    adapter = get_task(cfg)
    timings = dict(d.timings)
    task, teacher, student = d.task, d.teacher, d.student
    recipe = _recipe(cfg)
    with tempfile.TemporaryDirectory(prefix="fscompile-work-") as work_s:
        work = Path(work_s)
        with timed(timings, "compile", progress):
            cal = adapter.calibration(d, cfg)
            artifact = backend.compile(student, cal, out / "model", recipe)
        with timed(timings, "evaluate", progress):
            evaluation = adapter.evaluate(d, backend.load(artifact), cfg)
        vocab, length, real_len = adapter.input_size(d, cfg)
        with timed(timings, "profile", progress):
            teacher.save_torch(work / "teacher")
            student.save_torch(work / "student")
            prof = profile_all(work / "teacher", work / "student", artifact.path / artifact.model_file, vocab, length,
                               cfg.profile_seconds, real_len)
        with timed(timings, "verify", progress):
            # the unpruned twin only needs the kept INT8 variant: latency does not depend on calibration
            twin = dataclasses.replace(recipe, variant=artifact.info.get("variant"))
            unpruned_ms = (unpruned_latency(backend, d.unpruned, cal, twin, work, vocab, length, cfg)
                           if d.unpruned is not None and backend.available()[0] else None)
            verification = verify(cfg, backend, evaluation, prof, unpruned_ms)
            if cfg.fallback and not verification["ok"]:
                artifact, evaluation, prof = fall_back(lambda run: adapter.evaluate(d, run, cfg), student, cal, recipe,
                                                       artifact, evaluation, prof, vocab, length, cfg)
                verification["fallback"] = artifact.info.get("fallback")
        sizes = {"teacher": _dir_mb(work / "teacher", "*.safetensors"),
                 "student": _dir_mb(work / "student", "*.safetensors"),
                 "artifact": _dir_mb(artifact.path, "*.onnx")}
    params = {"teacher": teacher.num_parameters(), "student": student.num_parameters(),
              "artifact": student.num_parameters()}
    timings["total"] = round(time.perf_counter() - start, 2)
    transfer = d.transfer.origin if d.transfer is not None else []
    manifest = {
        "fscompile_version": _version(),
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
                 "input_length": length, "real_seq_len": real_len},
        "student": {"architecture": getattr(student, "arch", None), "layers_kept": d.keep,
                    "prepare": student.info.get("prepare"), "weights_sha256": weights_sha256(student),
                    "embeddings": student.info.get("embeddings"),
                    "layer_selection": student.info.get("layer_selection"), "parameters": params["student"]},
        "distillation": {**dataclasses.asdict(d.stats),
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
    write_json(out / MANIFEST, manifest)
    (out / "report.md").write_text(render_markdown(manifest))
    return manifest


def run(cfg: CompileConfig, out: Path, *, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Compile ``cfg`` into ``out`` and return the manifest. Nothing is written on failure."""
    progress = progress or _noop
    start = time.perf_counter()
    out = Path(out)
    check_out(out, cfg.fingerprint(), force)
    backend = resolve_backend(cfg)
    d = distill_stage(cfg, backend, progress)
    with staged(out) as stage:
        manifest = build(d, backend, cfg, stage, progress, start)
    if d.checkpoint is not None:  # the run landed: its resume point is no longer needed
        shutil.rmtree(d.checkpoint, ignore_errors=True)
    manifest["out_dir"] = str(out.resolve())
    return manifest


class TextClassificationTask:
    """The text-classification adapter: the stages above."""

    name = "text-classification"

    def distill_stage(self, cfg: CompileConfig, backend: Backend | None, progress: Progress) -> Distilled:
        return text_distill_stage(cfg, backend, progress)

    def calibration(self, d: Distilled, cfg: CompileConfig) -> CalibrationSet:
        return calibration_set(d.student, d.transfer, cfg)

    def evaluate(self, d: Distilled, runner: Any, cfg: CompileConfig) -> dict[str, Any]:
        return evaluate_all(d.task, d.teacher, d.student, runner, cfg.distill.max_length)

    def input_size(self, d: Distilled, cfg: CompileConfig) -> tuple[int, int, int | None]:
        return d.teacher.tokenizer.vocab_size, cfg.seq_len, real_seq_len(d.task, d.student, cfg.distill.max_length)

    def predictions(self, d: Distilled, runner: Any, model: TextModel, max_length: int = 128) -> np.ndarray:
        """``model``'s logits on the evaluation rows, through ``runner`` (None: in PyTorch)."""
        return predict(runner or torch_runner(model), model.tokenizer, model.input_names, d.task.eval, max_length)

    def score(self, d: Distilled, preds: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        return metrics(preds, np.array([e.label for e in d.task.eval]), reference.argmax(-1))


def _version() -> str:
    from . import __version__

    return __version__
