"""Extractive question answering (SQuAD 1.1 / 2.0): KD on start/end distributions, EM/F1.

The student keeps a subset of the teacher's layers (as for text classification); the transfer
set is the shots with their question or their context augmented; the teacher runs on the fly
(span logits vary in length, so they are not cached). Contexts longer than the input are cut
into overlapping windows (Hugging Face's doc stride), every window a feature of its question.
Answers are decoded the usual way: the best start/end pair inside a window's context (end >=
start, at most 30 tokens) over all windows, against the lowest no-answer score at [CLS] plus a
threshold. The student's threshold is tuned on held-out questions (augmented shots, or a
quarter of the --unlabeled pool) so that its answers match the teacher's there (abstentions
included), and travels in its config.json; EM and
F1 follow the official SQuAD 2.0 rules (an unanswerable question is right only when the
prediction is empty), with the HasAns/NoAns breakdown of the official script.
"""
from __future__ import annotations

import collections
import math
import re
import string
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..calibration import Batches, CalibrationSet, batches_from_encodings, from_transfer
from ..config import CompileConfig, DistillConfig
from ..data import Example
from ..data.batching import length_sorted_batches, pad_batch
from ..data.qa import QAExample, QATaskData
from ..distill import (
    BestCheckpoint,
    DistillStats,
    EpochSampler,
    freeze_word_embeddings,
    hidden_loss,
    layer_map,
    set_seed,
    text_lr,
    text_optimizer,
    update,
    use_bf16,
)
from ..models.qa import QAModel
from .base import Distilled, Progress, prepare, timed

QA_LENGTH = 384  # Hugging Face's convention for SQuAD: most contexts fit whole
DOC_STRIDE = 128  # tokens shared by consecutive windows of a long context (Hugging Face's default)
MAX_ANSWER_TOKENS = 30


def qa_length(cfg: CompileConfig | None, model: QAModel) -> int:
    """Tokens per question + context: 384 (or more if --max-length asks), within the model's positions."""
    want = max(cfg.distill.max_length, QA_LENGTH) if cfg is not None else QA_LENGTH
    return min(want, getattr(model.config, "max_position_embeddings", want))


def windows(tokenizer: Any, questions: list[str], contexts: list[str], max_length: int,
            offsets: bool = False) -> Any:
    """Question + context features: the context cut into windows of ``max_length`` tokens that
    overlap by the doc stride (never the question); ``overflow_to_sample_mapping`` gives each
    window's question."""
    q_max = max((len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions), default=0)
    # the window must leave room for the stride after the question and the special tokens
    stride = min(DOC_STRIDE, max(0, (max_length - q_max - 4) // 2))
    try:
        return tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
                         return_overflowing_tokens=True, return_offsets_mapping=offsets)
    except Exception as e:  # the fast tokenizer refuses when a question leaves no room for context
        from ..errors import InputError

        raise InputError(f"a question is too long for {max_length}-token inputs ({q_max} tokens): "
                         f"raise --max-length ({str(e).splitlines()[0][:120]})") from None


def encode(model: QAModel, examples: list[QAExample], max_length: int) -> Any:
    """The evaluation features of ``examples``, with character offsets for decoding."""
    return windows(model.tokenizer, [e.question for e in examples], [e.context for e in examples], max_length, True)


def span_logits(runner: Callable[[dict[str, np.ndarray]], np.ndarray], model: QAModel, enc: Any,
                batch_size: int = 32) -> list[np.ndarray]:
    """Per example, its [tokens, 2] start/end scores (batched by length, padding cut off)."""
    out: list[np.ndarray] = [np.empty(0)] * len(enc["input_ids"])
    pad = model.tokenizer.pad_token_id or 0
    for idx in length_sorted_batches(enc, batch_size):
        logits = np.asarray(runner(pad_batch(enc, idx, model.input_names, pad)), dtype=np.float32)
        for r, i in enumerate(idx):
            out[i] = logits[r, :len(enc["input_ids"][i])]
    return out


def decode_scored(logits: list[np.ndarray], enc: Any, examples: list[QAExample],
                  top: int = 20) -> list[tuple[str, float]]:
    """Per example, its best span over its windows (at most 30 tokens, end >= start) and how far
    its lowest no-answer score lies above that span's score (Hugging Face's ``score_diff``;
    infinite when no window holds context)."""
    best: list[tuple[float, str]] = [(-math.inf, "")] * len(examples)
    null = [math.inf] * len(examples)
    for f, lg in enumerate(logits):
        i = enc["overflow_to_sample_mapping"][f]
        seq, offsets, context = enc.sequence_ids(f), enc["offset_mapping"][f], examples[i].context
        start, end = lg[:, 0], lg[:, 1]
        null[i] = min(null[i], float(start[0] + end[0]))
        ctx = [j for j, s in enumerate(seq) if s == 1]
        if not ctx:
            continue
        lo, hi = ctx[0], ctx[-1]
        starts = np.argsort(start[lo:hi + 1])[::-1][:top] + lo
        ends = np.argsort(end[lo:hi + 1])[::-1][:top] + lo
        for s in starts:
            for e in ends:
                if s <= e < s + MAX_ANSWER_TOKENS and start[s] + end[e] > best[i][0]:
                    best[i] = (float(start[s] + end[e]), context[offsets[s][0]:offsets[e][1]])
    return [(text, n - score) for (score, text), n in zip(best, null)]


def decode(logits: list[np.ndarray], enc: Any, examples: list[QAExample], threshold: float = 0.0) -> list[str]:
    """The answer text per example ("" = no answer): the best span, unless the no-answer score
    beats it by more than ``threshold`` (Hugging Face's ``null_score_diff_threshold``)."""
    return [text if diff <= threshold else "" for text, diff in decode_scored(logits, enc, examples)]


def null_threshold(model: QAModel) -> float:
    """The no-answer threshold ``model`` was tuned to (0, Hugging Face's default, if never tuned);
    it travels in the model's ``config.json``."""
    return float(getattr(model.config, "null_score_diff_threshold", 0.0))


def tune_threshold(scored: list[tuple[str, float]], reference: list[str]) -> tuple[float, float]:
    """The no-answer threshold at which ``scored`` (from :func:`decode_scored`) agrees best with
    the ``reference`` answers ("" = abstain) in mean SQuAD F1, and that F1. This is the official
    SQuAD 2.0 script's best-threshold search, run against the teacher instead of gold: a student
    whose no-answer scores are shifted, say always a little above its span scores, then abstains
    as often as the teacher rather than always. Among equally good thresholds, the one nearest 0."""
    if not scored:
        return 0.0, math.nan
    diffs = np.array([d for _, d in scored])
    gain = np.array([f1_score(t, r) - f1_score("", r) for (t, _), r in zip(scored, reference)])
    base = float(np.sum([f1_score("", r) for r in reference]))
    order = [i for i in np.argsort(diffs, kind="stable") if np.isfinite(diffs[i])]
    edges = [-math.inf, *diffs[order].tolist(), math.inf]
    # candidate k answers the k questions with the smallest diffs: thresholds in [edges[k], edges[k+1])
    totals = base + np.concatenate([[0.0], np.cumsum(gain[order])])
    best_total = totals.max()

    def point(k: int) -> float:
        lo, hi = edges[k], edges[k + 1]
        if lo <= 0 < hi:
            return 0.0
        return hi - 1.0 if lo == -math.inf else lo + 1.0 if hi == math.inf else (lo + hi) / 2

    ties = [point(k) for k in range(len(totals)) if totals[k] >= best_total - 1e-9 and edges[k] < edges[k + 1]]
    return min(ties, key=abs), float(best_total / len(scored))


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(preds: list[str], examples: list[QAExample], reference: list[str] | None = None) -> dict[str, float]:
    """EM and F1 (max over gold answers; unanswerable gold = [""]), as fractions, and as the
    official script also split into answerable (``has_answer_*``) and unanswerable questions
    (``no_answer_accuracy``: abstained when it should), so a model that always abstains shows.
    With the teacher's answers, agreement = share of identical (normalised) answers.
    ``accuracy`` and ``macro_f1`` carry EM and F1 so tables across tasks share their columns."""
    em = np.array([max(float(normalize(p) == normalize(g)) for g in (e.answers or ("",)))
                   for p, e in zip(preds, examples)])
    f1 = np.array([max(f1_score(p, g) for g in (e.answers or ("",))) for p, e in zip(preds, examples)])
    has = np.array([bool(e.answers) for e in examples])
    out = {"exact_match": float(em.mean()), "f1": float(f1.mean()), "n": len(examples)}
    if has.any():
        out.update(has_answer_exact=float(em[has].mean()), has_answer_f1=float(f1[has].mean()),
                   has_answer_n=int(has.sum()))
    if (~has).any():
        out.update(no_answer_accuracy=float(em[~has].mean()), no_answer_n=int((~has).sum()))
    out.update(accuracy=out["exact_match"], macro_f1=out["f1"])
    if reference is not None:
        out["agreement"] = float(np.mean([normalize(p) == normalize(r) for p, r in zip(preds, reference)]))
    return out


def torch_qa_runner(model: QAModel):
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model.module(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()
    return run


def _span_kd(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the start and of the end distributions over real tokens, plus the
    same over the answer positions alone ([CLS] left out, both renormalised): where the teacher
    abstains it puts nearly all its mass on [CLS], and the full KL alone then barely says where
    its answer would lie, so a student learns to abstain before it learns spans."""
    spans = mask.clone()
    spans[:, 0] = 0
    total, neg = s.new_zeros(()), torch.finfo(s.dtype).min / 2
    for keep in (mask, spans):
        m = keep.unsqueeze(-1).bool()
        ls = F.log_softmax(s.masked_fill(~m, neg) / temperature, 1)
        lt = F.log_softmax(t.masked_fill(~m, neg) / temperature, 1)
        total = total + F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    return total * temperature ** 2 / 2


def distill_qa(teacher: QAModel, student: QAModel, texts: list[str], pairs: list[str], keep: list[int],
               cfg: DistillConfig, seed: int, max_length: int,
               progress: Callable[[int, int, float], None] | None = None,
               validation: tuple[list[str], list[str]] | None = None) -> DistillStats:
    """KD on span distributions + hidden-state matching of each kept layer to its teacher layer."""
    cfg = cfg.resolved()
    start_t = time.perf_counter()
    set_seed(seed)
    tok = student.tokenizer
    enc = windows(tok, texts, pairs, max_length)  # long contexts: every window is a training feature
    names, pad = student.input_names, tok.pad_token_id or 0
    pairs_map = layer_map(keep)
    model = student.module
    freeze_word_embeddings(student, False)  # as for text classification
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = text_optimizer(params, cfg)
    v = None
    if validation is not None:
        # F1 against the teacher's decoded answers, at the student's best no-answer threshold:
        # per-window argmax agreement is dominated by [CLS] and rewards a student that always
        # abstains, and an untuned threshold hides a student whose spans are right
        v_rows = [QAExample(str(i), q, c, (), ()) for i, (q, c) in enumerate(zip(*validation))]
        v_enc = encode(teacher, v_rows, max_length)
        v = (v_rows, v_enc, [normalize(a) for a in decode(span_logits(torch_qa_runner(teacher), teacher, v_enc),
                                                             v_enc, v_rows, null_threshold(teacher))])
    eval_at = {round(cfg.steps * (k + 1) / cfg.evals) for k in range(cfg.evals)} if v else set()
    bf16 = use_bf16(cfg.bf16)
    sampler = EpochSampler(len(enc["input_ids"]), cfg.batch_size, np.random.default_rng(seed))
    totals = {"kd": 0.0, "hidden": 0.0}
    ema, best = math.nan, BestCheckpoint(cfg.steps)
    teacher.module.eval()
    model.train()
    for step in range(cfg.steps):
        idx = sampler.next()
        batch = {k: torch.from_numpy(x) for k, x in pad_batch(enc, idx, names, pad).items()}
        with torch.no_grad():
            t_out = teacher.module(**batch, output_hidden_states=cfg.hidden_weight > 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch, output_hidden_states=cfg.hidden_weight > 0)
        mask = batch["attention_mask"]
        loss = _span_kd(out.logits.float(), t_out.logits.float(), mask, cfg.temperature)
        totals["kd"] += loss.item()
        if cfg.hidden_weight > 0:
            h = sum(hidden_loss(out.hidden_states[s + 1].float(), t_out.hidden_states[t + 1], mask)
                    for s, t in pairs_map) / len(pairs_map)
            loss = loss + cfg.hidden_weight * h
            totals["hidden"] += h.item()
        update(loss, opt, sched, params)
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        if step + 1 in eval_at:
            model.eval()
            scored = decode_scored(span_logits(torch_qa_runner(student), student, v[1]), v[1], v[0])
            t, f1 = tune_threshold(scored, v[2])
            agree = float(np.mean([normalize(a if d <= t else "") == r for (a, d), r in zip(scored, v[2])]))
            model.train()
            best.check(step + 1, f1, model, f1=f1, agreement=agree, threshold=t)
        if progress:
            progress(step + 1, cfg.steps, ema)
    if best.restore(model):
        # the no-answer threshold tuned with the kept weights; config.json carries it to the artifact
        student.config.null_score_diff_threshold = next(c["threshold"] for c in best.curve if c["step"] == best.step)
    model.eval()
    return DistillStats(steps=cfg.steps, transfer_size=len(texts), seconds=time.perf_counter() - start_t,
                        final_loss=ema, losses={k: v_ / cfg.steps for k, v_ in totals.items()}, layer_map=pairs_map,
                        best_step=best.step, validation=best.curve, lr=text_lr(cfg))


def as_examples(task: QATaskData) -> list[Example]:
    """Shots as (question, context) text pairs, for the text augmentations."""
    return [Example(e.question, e.label, e.context) for e in task.shots]


def evaluate_qa(task: QATaskData, teacher: QAModel, student: QAModel, artifact_runner: Any,
                max_length: int) -> dict[str, Any]:
    enc = encode(student, task.eval, max_length)
    ref = decode(span_logits(torch_qa_runner(teacher), teacher, enc), enc, task.eval, null_threshold(teacher))
    t = null_threshold(student)  # the artifact is the student: same threshold
    stu = decode(span_logits(torch_qa_runner(student), student, enc), enc, task.eval, t)
    art = decode(span_logits(artifact_runner, student, enc), enc, task.eval, t)
    return {"teacher": squad_metrics(ref, task.eval, ref), "student": squad_metrics(stu, task.eval, ref),
            "artifact": squad_metrics(art, task.eval, ref)}


class QuestionAnsweringTask:
    """The extractive-QA adapter."""

    name = "question-answering"

    def distill_stage(self, cfg: CompileConfig, backend: Any, progress: Any):
        from ..augment import TransferSet, build_transfer_set, vocabulary_words
        from ..checkpoint import checkpoint_dir, resume_or_distill
        from ..data.qa import load_qa_task, load_unlabeled_qa
        from ..errors import InputError
        from ..models.qa import load_qa_teacher
        from ..models.text import derive_student, parse_layers

        if cfg.embedding_rank:
            raise InputError("--embedding-rank applies to text classification only")
        timings: dict[str, float] = {}
        set_seed(cfg.seed)
        with timed(timings, "load data", progress):
            task = load_qa_task(cfg.data, cfg.shots, cfg.seed, cfg.max_eval)
        with timed(timings, "load teacher", progress):
            teacher = load_qa_teacher(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        length = qa_length(cfg, teacher)
        with timed(timings, "derive student", progress):
            mask = teacher.tokenizer.mask_token or teacher.tokenizer.unk_token or "[MASK]"
            ops = tuple(o for o in cfg.distill.ops.split(",") if o != "near")
            from ..augment import Lexicon

            lexicon = Lexicon(vocabulary_words(teacher.tokenizer))  # for the transfer and validation variants
            transfer = build_transfer_set(as_examples(task), cfg.distill.augment, cfg.seed, mask, None, ops, lexicon)
            held: list[tuple[str, str]] = []
            if cfg.distill.unlabeled:  # real questions on real contexts: what augmenting 20 shots cannot make
                pool = load_unlabeled_qa(cfg.distill.unlabeled, task.eval)
                order = np.random.default_rng(cfg.seed + 7919).permutation(len(pool)).tolist()
                # a quarter (at most 256) held out: early stopping then scores new contexts, not the shots'
                held = [pool[i] for i in order[:min(256, len(pool) // 4)]]
                # at most steps x batch questions train: more is teacher time the distillation cannot show
                for i in order[len(held):len(held) + cfg.distill.resolved().steps * cfg.distill.batch_size]:
                    transfer.texts.append(pool[i][0])
                    transfer.pairs.append(pool[i][1])
                    transfer.origin.append("unlabeled")
            n = len(teacher.layers())
            plan = parse_layers(cfg.student_layers, n)
            if isinstance(plan, int):  # a count: evenly spaced (measured selection is built for classifiers)
                plan = sorted({int(round(x)) for x in np.linspace(0, n - 1, plan)})
            student, keep = derive_student(teacher, plan)
            student, unpruned = prepare(student, backend, cfg)
        ckpt = checkpoint_dir(cfg, backend)
        with timed(timings, "distill", progress):
            def train() -> DistillStats:
                validation = None
                if held:
                    validation = ([q for q, _ in held], [c for _, c in held])
                elif cfg.distill.evals:  # no pool: augmented variants of the shots, drawn apart from the transfer set
                    val = build_transfer_set(as_examples(task), max(1, 256 // len(task.shots)), cfg.seed + 7919, mask,
                                             None, ops, lexicon)
                    k = len(task.shots)
                    validation = (val.texts[k:], val.pairs[k:]) if val.pairs else None
                validation = validation if cfg.distill.evals else None
                return distill_qa(teacher, student, transfer.texts, transfer.pairs or [], keep, cfg.distill, cfg.seed,
                                  length, lambda d, t, loss: progress("distill", d, t, f"loss {loss:.4f}"), validation)

            student, stats = resume_or_distill(ckpt, student, progress, train)
        assert isinstance(transfer, TransferSet)
        return Distilled(task, teacher, student, keep, transfer, stats, None, unpruned, timings, ckpt)

    def retarget(self, d: Distilled, backend: Any, cfg: CompileConfig, steps: int, progress: Progress) -> Distilled:
        return d  # pruned in its own compile only: one recovery per target costs a QA distillation

    def calibration(self, d: Any, cfg: CompileConfig) -> CalibrationSet:
        """Transfer questions in windows: a seeded half (at most 128) calibrates, others validate."""
        length = qa_length(cfg, d.student)

        def batches(idx: list[int]) -> Batches:
            enc = windows(d.student.tokenizer, [d.transfer.texts[i] for i in idx],
                          [d.transfer.pairs[i] for i in idx], length)
            return batches_from_encodings(enc, d.student.input_names, d.student.tokenizer.pad_token_id or 0)

        return from_transfer(len(d.transfer), batches, cfg.seed, n_calibrate=128, n_validate=128)

    def evaluate(self, d: Any, runner: Any, cfg: CompileConfig) -> dict[str, Any]:
        return evaluate_qa(d.task, d.teacher, d.student, runner, qa_length(cfg, d.student))

    def input_size(self, d: Any, cfg: CompileConfig) -> tuple[int, int, int | None]:
        length = qa_length(cfg, d.student)
        enc = encode(d.student, d.task.eval[:512], length)
        return d.teacher.tokenizer.vocab_size, length, int(np.median([len(x) for x in enc["input_ids"]]))

    def predictions(self, d: Any, runner: Any, model: QAModel) -> list[str]:
        """``model``'s answers on the evaluation questions, through ``runner`` (None: in PyTorch)."""
        enc = encode(model, d.task.eval, qa_length(None, model))
        return decode(span_logits(runner or torch_qa_runner(model), model, enc), enc, d.task.eval, null_threshold(model))

    def score(self, d: Any, preds: list[str], reference: list[str]) -> dict[str, Any]:
        return squad_metrics(preds, d.task.eval, reference)
