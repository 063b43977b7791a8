"""Text classification (single texts and sentence pairs): the transfer set grown from the shots
(plus any unlabelled text), the layers the student keeps, KD with hidden-state matching, and the
calibration set; the adapter the pipeline calls."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from ..adapt import fit_head
from ..augment import (
    Lexicon,
    TransferSet,
    build_transfer_set,
    nearest_words,
    vocabulary_words,
)
from ..backends import Backend
from ..calibration import BATCH, Batches, CalibrationSet, batches_from_encodings, split
from ..checkpoint import checkpoint_dir, resume_or_distill
from ..config import CompileConfig, DistillConfig
from ..data import Example, TaskData, load_task_data, load_unlabeled
from ..data.batching import length_sorted_batches
from ..distill import POOL_LR, DistillStats, distill, set_seed
from ..evaluate import dropout_probabilities, evaluate_all, metrics, predict, real_seq_len, torch_runner
from ..errors import StageError
from ..outdir import dir_mb
from ..generate import Generated, balance, cached_generate, default_count, resolve_generator
from ..models.text import (
    TextModel,
    align_labels,
    derive_student,
    factorize_embeddings,
    load_teacher,
    parse_layers,
    select_layers,
)
from .base import Distilled, Progress, prepare, recovered, timed


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


def transfer_set(task: TaskData, teacher: TextModel, cfg: CompileConfig,
                 generated: Generated | None = None) -> TransferSet:
    """The shots, their augmented variants, any ``--unlabeled`` text and the ``generated`` texts."""
    unlabeled = None
    if cfg.distill.unlabeled:
        # more texts than the distillation steps can show is teacher time spent for nothing
        unlabeled = load_unlabeled(cfg.distill.unlabeled, task.eval + task.shots,
                                   cfg.distill.resolved().steps * cfg.distill.batch_size, cfg.seed)
    ts = _grow(task, teacher, cfg, cfg.distill.augment, cfg.seed, unlabeled)
    if generated is not None and generated.texts:
        ts.texts.extend(generated.texts)
        if ts.pairs is not None:
            ts.pairs.extend(generated.pairs or [""] * len(generated.texts))
        ts.origin.extend(["generated"] * len(generated.texts))
    return ts


def generated_inputs(task: TaskData, teacher: TextModel, cfg: CompileConfig,
                     progress: Progress) -> Generated | None:
    """Inputs the generator LM writes from the shots (cached), balanced by the teacher's labels
    so that no class starves; None with ``--generator none`` or ``--generate 0``."""
    n = cfg.distill.generate if cfg.distill.generate is not None else default_count(task.shots)
    if cfg.distill.generator == "none" or n == 0:
        return None
    gen = cached_generate(cfg.distill.generator, task.shots, n, cfg.seed, task.eval,
                          trust_remote_code=cfg.trust_remote_code,
                          progress=lambda d, t: progress("generate", d, t, f"{d} texts"))
    if not gen.texts:
        return gen
    labels = predict(torch_runner(teacher), teacher.tokenizer, teacher.input_names,
                     [Example(t, 0, p) for t, p in zip(gen.texts, gen.pairs or [None] * len(gen.texts))],
                     cfg.distill.max_length).argmax(-1).tolist()
    keep = balance(labels, len(teacher.label_names), cfg.seed)
    gen.texts = [gen.texts[i] for i in keep]
    gen.pairs = [gen.pairs[i] for i in keep] if gen.pairs is not None else None
    return gen


def distill_config(cfg: CompileConfig, transfer: TransferSet) -> DistillConfig:
    """``cfg.distill``, at the pool learning rate when generated texts are in the transfer set and no
    ``--lr`` was given (as with ``--unlabeled``): on SST-2 draw 0 with 600 generated texts, 2e-4 kept
    0.8383 against 0.8245 at 5e-5 (shots alone: 0.8154)."""
    if cfg.distill.lr is None and "generated" in transfer.origin:
        return dataclasses.replace(cfg.distill, lr=POOL_LR)
    return cfg.distill


def sources(transfer: TransferSet, gen: Generated | None) -> dict[str, Any]:
    """What the student learnt from, for the manifest and the report."""
    out: dict[str, Any] = {o: transfer.origin.count(o) for o in ("shot", "unlabeled", "generated")}
    out["augmented"] = sum(o.startswith("aug:") for o in transfer.origin)
    if gen is not None:
        out["generator"] = {"name": gen.generator, "kept": len(gen.texts), "sampled": gen.sampled,
                            "seconds": round(gen.seconds, 1), "cached": gen.cached}
    return out


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
    """With --unlabeled or generated text, a quarter of it (at most ``size`` texts) set apart for early
    stopping, as the QA task does with its question pool: agreement on fresh variants of the
    shots saturates near 98% and says little about real inputs; held-out real text does.
    Returns (the transfer set without them, the held-out texts or None)."""
    pool = [i for i, o in enumerate(transfer.origin) if o in ("unlabeled", "generated")]
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
                    n_calibrate: int = 256, n_validate: int = 256, teacher: TextModel | None = None,
                    temperature: float | None = None) -> CalibrationSet:
    """Calibrate on the shots plus augmented variants; other items validate (``calibration.split``).
    Where the transfer set holds generated or unlabelled text, half of it (at most ``n_validate``)
    validates instead: the INT8 variants are compared on text like the real inputs, not on
    augmented shots, where every variant agrees near 99%. With ``teacher``, its probabilities on the
    validation rows come too, read as the label-free retention estimate reads them (at ``temperature``)."""
    def encode(idx: list[int]) -> dict[str, list[list[int]]]:
        texts = [transfer.texts[i] for i in idx]
        pairs = [transfer.pairs[i] for i in idx] if transfer.pairs is not None else None
        return student.tokenizer(texts, pairs, truncation=True, max_length=cfg.distill.max_length)

    def batches(enc: dict[str, list[list[int]]]) -> Batches:
        return batches_from_encodings(enc, student.input_names, student.tokenizer.pad_token_id or 0, BATCH)

    shots = transfer.origin.count("shot")
    real = [i for i, o in enumerate(transfer.origin) if o in ("generated", "unlabeled")]
    if len(real) >= 64:
        val = np.random.default_rng(cfg.seed + 1).choice(real, min(n_validate, len(real) // 2), replace=False)
        val_idx = sorted(val.tolist())
        held = set(val_idx)
        rest = [i for i in range(len(transfer)) if i not in held]  # the shots stay first
        cal, _ = split(len(rest), cfg.seed, shots=shots, n_calibrate=n_calibrate, n_validate=0)
        cal_idx = [rest[i] for i in cal]
    else:
        cal_idx, val_idx = split(len(transfer), cfg.seed, shots=shots, n_calibrate=n_calibrate,
                                 n_validate=n_validate)
    val_enc = encode(val_idx)
    out = CalibrationSet(calibrate=batches(encode(cal_idx)), validate=batches(val_enc))
    if teacher is not None:
        def read() -> list[np.ndarray]:
            rows = [Example(transfer.texts[i], 0, transfer.pairs[i] if transfer.pairs is not None else None)
                    for i in val_idx]
            logits = predict(torch_runner(teacher), teacher.tokenizer, teacher.input_names, rows,
                             cfg.distill.max_length)
            probs = dropout_probabilities(teacher, rows, logits, cfg.distill.max_length, temperature)
            # row for row with the validation batches, which batches_from_encodings sorted by length
            return [probs[g] for g in length_sorted_batches(val_enc, BATCH)]

        out.read_teacher = read
    return out


def is_teacher(keep: list[int], n: int, cfg: CompileConfig) -> bool:
    """Whether the "student" is the whole teacher (every layer, nothing pruned or factorised):
    then there is nothing to distil, and the teacher itself is compiled for the target."""
    return keep == list(range(n)) and cfg.prune_rate() == 0 and not cfg.embedding_rank


def evenly_spaced(k: int, n: int) -> list[int]:
    """``k`` of ``n`` layers spread evenly, the last always kept (3 of 6: 1, 3, 5, as every-other)."""
    return sorted({max(0, round((i + 1) * n / k) - 1) for i in range(k)})


PROBE_PASSES = 2  # timing passes over the shapes (see probe_shapes)


def probe_shapes(cfg: CompileConfig, backend: Backend, candidates: Callable[[int], list[tuple[int, float, int]]],
                 work: Path, progress: Progress, peak: bool = False) -> tuple[list[tuple[int, float, int]],
                                                                          list[dict[str, float]], dict[str, Any]]:
    """Latency (batch 1 at ``cfg.seq_len``) and size of each recipe's artifact, before any training:
    the student of that many evenly spaced layers, the target's sparsity at that rate and the
    embedding table at those bits, compiled with dynamic INT8 (the variant without calibration
    data) and timed here, in turns, the lower of :data:`PROBE_PASSES` figures. Weights do not change
    latency or size, so no distillation is needed.
    ``candidates(n)`` lists the (layers, prune, embedding bits) recipes for a teacher of ``n`` layers.
    With ``peak``, each shape is timed in a fresh process instead, as a build is profiled, which also
    gives the serving process's peak memory (``peak_mb``; about 2 s more per shape). Each shape's
    artifact stays in ``work`` with its inputs (``probe``), for timing a trained build beside it.
    Returns the recipes, their figures, and the task's traits in the recipe memory's keys (with
    ``teacher_layers``)."""
    from ..profile import ProfileRequest, in_turns, profile_model, synthetic_inputs

    task = load_data(cfg)
    teacher = load_teacher(cfg.teacher, task.label_names, trust_remote_code=cfg.trust_remote_code)
    n = len(teacher.layers())
    recipes = candidates(n)
    shots = TransferSet([e.text for e in task.shots],
                        [e.text_pair or "" for e in task.shots] if task.is_pair else None, ["shot"] * len(task.shots))
    vocab = teacher.tokenizer.vocab_size
    out, runs = [], {}
    for i, (layers, prune, bits) in enumerate(recipes):
        progress("probe shapes", i, len(recipes), f"{layers} layers, prune {prune:g}, {bits}-bit table")
        rcfg = dataclasses.replace(cfg, prune=prune, embedding_bits=bits)
        student, _ = derive_student(teacher, evenly_spaced(layers, n))
        student = backend.prepare(student, rcfg.recipe())
        cal = calibration_set(student, shots, rcfg, n_calibrate=8, n_validate=8)
        try:
            art = backend.compile(student, cal, work / f"probe-{i}", dataclasses.replace(rcfg.recipe(),
                                                                                       variant="dynamic-per-channel"))
        except StageError as e:  # this shape does not build for the target: the search drops it, says why
            out.append({"latency_ms": math.inf, "size_mb": math.inf, "error": str(e)[:200]})
            continue
        # kept (on disk, with its inputs) so that a trial of this shape can be timed beside it (search._as_probed)
        feed = synthetic_inputs(student.input_names, 1, cfg.seq_len, vocab)
        shape = {"size_mb": dir_mb(art.path, "*.onnx"), "probe": (art, feed)}
        if peak:
            prof = profile_model(ProfileRequest("onnx", str(art.path / art.model_file), vocab, cfg.seq_len,
                                                batches=(1,), budget_s=0.5))
            shape.update(latency_ms=prof["batch1"]["p50_ms"], peak_mb=prof["peak_rss_mb"])
        else:  # loaded now, timed below
            runs[i] = (lambda run=backend.load(art), feed=feed: run(feed))
        out.append(shape)
    if runs:  # every shape timed in turns, so that the ranking compares shapes, not minutes of a drifting host
        progress("probe shapes", len(recipes), len(recipes), f"timing {len(runs)} shapes in turns")
        # twice, keeping each shape's lower figure: noise on a shared host only adds time, and a shape is dropped on
        # this figure. In run 10 (benchmarks/results/README.md) the default recipe's shape timed 4.14 ms in one pass,
        # and 2.28-2.74 ms in four passes of a rerun, so the search never tried it
        for i, *ms in zip(runs, *(in_turns(list(runs.values()), budget_s=0.5) for _ in range(PROBE_PASSES))):
            out[i]["latency_ms"] = min(ms)
        runs.clear()  # the sessions go; the files stay until the search's scratch directory does
    progress("probe shapes", len(recipes), len(recipes), "")
    traits = {"task": "text-classification", "teacher_type": teacher.info.get("model_type"),
              "teacher_parameters": teacher.num_parameters(), "labels": len(teacher.label_names),
              "shots": cfg.shots, "text_length": real_seq_len(task, teacher, cfg.distill.max_length),
              "teacher_layers": n}
    return recipes, out, traits


def distill_stage(cfg: CompileConfig, backend: Backend | None, progress: Progress) -> Distilled:
    """Text classification: transfer set, layer choice, derived student, KD + hidden matching."""
    timings: dict[str, float] = {}
    set_seed(cfg.seed)
    if cfg.distill.generator != "none" and cfg.distill.generate != 0:
        resolve_generator(cfg.distill.generator)  # a missing generator fails now, not after adapting the teacher
    with timed(timings, "load data", progress):
        task = load_data(cfg)
    with timed(timings, "load teacher", progress):
        teacher = load_teacher(cfg.teacher, task.label_names, trust_remote_code=cfg.trust_remote_code)
        task = to_teacher_labels(task, teacher)
    with timed(timings, "adapt teacher", progress):
        adaptation = adapt(teacher, task, cfg)
    with timed(timings, "generate", progress):
        gen = generated_inputs(task, teacher, cfg, progress)
    with timed(timings, "derive student", progress):
        transfer = transfer_set(task, teacher, cfg, gen)
        learnt_from = sources(transfer, gen)
        transfer, held = hold_out_unlabeled(transfer, cfg.seed, 256 if cfg.distill.evals else 0)
        keep, selection = choose_layers(teacher, transfer, cfg)
        student, keep = derive_student(teacher, keep)
        student.info["layer_selection"] = selection
        if cfg.embedding_rank:
            student.info["embeddings"] = factorize_embeddings(student, cfg.embedding_rank)
        student, unpruned = prepare(student, backend, cfg)
    ckpt = checkpoint_dir(cfg, backend)
    with timed(timings, "distill", progress):
        if is_teacher(keep, len(teacher.layers()), cfg):  # nothing removed: the teacher is its own student
            stats = DistillStats(steps=0, transfer_size=len(transfer), seconds=0.0, final_loss=math.nan,
                                 layer_map=[(i, i) for i in keep])
        else:
            student, stats = resume_or_distill(ckpt, student, progress, lambda: distill(
                teacher, student, transfer, keep, distill_config(cfg, transfer), cfg.seed,
                validation=(held or validation_set(task, teacher, cfg)) if cfg.distill.evals else None,
                progress=lambda d, t, loss: progress("distill", d, t, f"loss {loss:.4f}")))
    return Distilled(task, teacher, student, keep, transfer, stats, adaptation, unpruned, timings, ckpt,
                     learnt_from)


def teacher_logits(d: Distilled, max_length: int = 128) -> np.ndarray:
    """The teacher's logits on the evaluation rows, read once (see ``Distilled.teacher_readings``)."""
    key = ("logits", max_length)
    if key not in d.teacher_readings:
        d.teacher_readings[key] = predict(torch_runner(d.teacher), d.teacher.tokenizer, d.teacher.input_names,
                                          d.task.eval, max_length)
    return d.teacher_readings[key]


def estimate_probabilities(d: Distilled, max_length: int = 128) -> np.ndarray:
    """The teacher's probabilities on the evaluation rows for the label-free retention estimate
    (:func:`~fscompile.evaluate.dropout_probabilities`), read once: every target and peer is scored
    against the same teacher on the same rows."""
    key = ("dropout", max_length)
    if key not in d.teacher_readings:
        d.teacher_readings[key] = dropout_probabilities(d.teacher, d.task.eval, teacher_logits(d, max_length),
                                                        max_length, d.teacher_temperature)
    return d.teacher_readings[key]


class TextClassificationTask:
    """The text-classification adapter: the stages above."""

    name = "text-classification"

    def distill_stage(self, cfg: CompileConfig, backend: Backend | None, progress: Progress) -> Distilled:
        return distill_stage(cfg, backend, progress)

    def retarget(self, d: Distilled, backend: Backend, cfg: CompileConfig, steps: int,
                 progress: Progress) -> Distilled:
        pool = dataclasses.replace(cfg, distill=distill_config(cfg, d.transfer))
        return recovered(d, backend, pool, steps, progress,
                         lambda student, dcfg: distill(d.teacher, student, d.transfer, d.keep, dcfg, cfg.seed))

    def calibration(self, d: Distilled, cfg: CompileConfig) -> CalibrationSet:
        return calibration_set(d.student, d.transfer, cfg, teacher=d.teacher, temperature=d.teacher_temperature)

    def probe_shapes(self, cfg: CompileConfig, backend: Backend,
                     candidates: Callable[[int], list[tuple[int, float, int]]], work: Path,
                     progress: Progress, peak: bool = False) -> tuple[list[tuple[int, float, int]],
                                                                      list[dict[str, float]], dict[str, Any]]:
        return probe_shapes(cfg, backend, candidates, work, progress, peak)

    def evaluate(self, d: Distilled, runner: Any, cfg: CompileConfig) -> dict[str, Any]:
        n = cfg.distill.max_length
        return evaluate_all(d.task, teacher_logits(d, n), estimate_probabilities(d, n), d.student, runner, n)

    def input_size(self, d: Distilled, cfg: CompileConfig) -> tuple[int, int, int | None]:
        return d.teacher.tokenizer.vocab_size, cfg.seq_len, real_seq_len(d.task, d.student, cfg.distill.max_length)

    def predictions(self, d: Distilled, runner: Any, model: TextModel, max_length: int = 128) -> np.ndarray:
        """``model``'s logits on the evaluation rows, through ``runner`` (None: in PyTorch)."""
        if runner is None and model is d.teacher:
            return teacher_logits(d, max_length)
        return predict(runner or torch_runner(model), model.tokenizer, model.input_names, d.task.eval, max_length)

    def score(self, d: Distilled, preds: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        return metrics(preds, np.array([e.label for e in d.task.eval]), reference,
                       estimate_probabilities(d))
