"""Causal language modelling (GPT-2 -> DistilGPT-2 style): KD on next-token distributions.

Shots are text passages. The transfer set is the passages cut into windows plus continuations
that the teacher samples from prefixes of them: the teacher labels every position of any text,
so its own samples are in-domain inputs that cost no labels (sequence-level KD). The loss is
KL(teacher || student) over every real position, plus hidden-state matching of each kept
block to the one it came from. Metrics on held-out passages: perplexity, next-token top-1
accuracy (``accuracy``, so tolerance checks and tables work as for other tasks), and top-1
agreement with the teacher.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..calibration import Batches, CalibrationSet, from_transfer
from ..config import DEFAULT_STEPS, CompileConfig, DistillConfig
from ..data.batching import length_sorted_batches, pad_batch
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
from ..models.lm import LMModel, derive_lm_student
from .base import Distilled, Progress, prepare, timed

# Without --steps, distillation reads a number of windows in inverse proportion to the teacher's size (a
# window costs a teacher pass and a student pass, both in proportion to it): 8,000 windows at 25 M
# parameters, as steps of --batch-size, at most 1000 steps, at least 50. SmolLM2-135M: 1,481 windows, 93
# steps of 16 (a step of 16 windows of 128 tokens took 10 s on 2 cores: about 15 minutes).
LM_WINDOWS = 8000
LM_WINDOW_PARAMS = 25e6
MIN_LM_STEPS = 50
# Next-token KD defaults (--lr, --temperature unset). A student missing half a deep decoder's blocks must
# move far from its initialisation: on SmolLM2-135M (15 of 30 blocks, 40 steps of 8 windows, held-out
# Wikipedia perplexity; teacher 29.3, untrained student 1,429) lr 5e-5 at T=2 reached 375, 3e-4 at T=2
# 172, 3e-4 at T=1 147 (the same with hidden matching off: 147), 1e-3 at T=1 126.
LM_LR = 1e-3
LM_TEMPERATURE = 1.0
# No MLP-channel pruning by default: on the same student and steps, 20% of the channels pruned left it at
# perplexity 1,045 against 147 unpruned. Half the blocks are already gone; --prune still prunes.
LM_PRUNE = 0.0
MAX_SAMPLES_PER_SHOT = 32  # each sample is a teacher generation: --augment is capped here for this task
SAMPLE_TOKENS = 64  # new tokens per teacher sample
PREFIX_TOKENS = (4, 16)  # prompt lengths drawn from the shots


@dataclass
class TokenTransfer:
    """Token windows to distil on, and where each came from ("shot" or "teacher-sample")."""

    ids: list[list[int]]
    origin: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def windows(model: LMModel, texts: list[str], length: int) -> list[list[int]]:
    """Each text tokenised and cut into windows of at most ``length`` tokens (at least 2)."""
    out = []
    for ids in model.tokenizer(texts)["input_ids"]:
        out += [ids[s:s + length] for s in range(0, len(ids), length) if len(ids[s:s + length]) >= 2]
    return out


def teacher_samples(teacher: LMModel, shots: list[list[int]], n: int, seed: int, length: int,
                    batch_size: int = 16, progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """``n`` continuations sampled (nucleus, p=0.95) from the teacher, each prompted by a random
    span of a shot; a batch shares one prompt length, so nothing is padded."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    eos = teacher.tokenizer.eos_token_id
    out: list[list[int]] = []
    for start in range(0, n, batch_size):
        rows = [shots[i] for i in rng.integers(len(shots), size=min(batch_size, n - start))]
        p = min(int(rng.integers(PREFIX_TOKENS[0], PREFIX_TOKENS[1] + 1)), *(len(r) - 1 for r in rows))
        prompts = []
        for r in rows:
            o = int(rng.integers(0, len(r) - p + 1))
            prompts.append(r[o:o + p])
        ids = torch.tensor(prompts)
        with torch.no_grad():
            gen = teacher.module.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                             top_p=0.95, top_k=0, max_new_tokens=max(1, min(SAMPLE_TOKENS, length - p)),
                                             pad_token_id=teacher.tokenizer.pad_token_id)
        for row in gen.tolist():
            new = row[p:]
            if eos is not None and eos in new:  # keep the end-of-text token once, drop the padding after it
                new = new[:new.index(eos) + 1]
            out.append(row[:p] + new)
        if progress:
            progress(len(out), n)
    teacher.module.eval()
    return out


def lm_steps(teacher_parameters: int, batch_size: int) -> int:
    """Distillation steps when ``--steps`` is not given (see :data:`LM_WINDOWS`)."""
    windows = LM_WINDOWS * min(1.0, LM_WINDOW_PARAMS / teacher_parameters)
    return max(MIN_LM_STEPS, min(DEFAULT_STEPS, round(windows / batch_size)))


def drop_block(teacher: LMModel, shots: list[list[int]], k: int) -> tuple[list[int], dict[str, Any]]:
    """Which ``k`` of the teacher's blocks to keep: the first and the last stay, and one contiguous
    run of the others is dropped, where the student so made predicts the shot windows best
    (perplexity: forward passes only, no labels). On SmolLM2-135M (30 blocks, 15 kept, SQuAD
    paragraphs), untrained students started at perplexity 1,345 (blocks 0-5 and 21-29 kept) against
    7.1 million for every other block (the teacher: 19.3): deep decoders spread what a block does over
    its neighbours, so a removed run costs less than removing every other one (Gromov et al. 2024)."""
    n = len(teacher.layers())
    drop = n - k
    if drop <= 0:
        return list(range(n)), {}
    starts = list(range(1, n - drop))  # the dropped run [start, start + drop) spares blocks 0 and n - 1
    if not starts:
        return list(range(n - k, n)), {}
    probe = sorted(shots, key=len, reverse=True)[:32]
    ppl: dict[int, float] = {}
    for start in starts:
        keep = [i for i in range(n) if not start <= i < start + drop]
        student = derive_lm_student(teacher, keep)
        ppl[start] = lm_metrics(token_scores(torch_lm_runner(student), student, probe), probe)["perplexity"]
        del student
    best = min(ppl, key=lambda s: ppl[s])
    keep = [i for i in range(n) if not best <= i < best + drop]
    return keep, {"rule": "first and last blocks kept, the contiguous run whose removal keeps the lowest "
                          "perplexity on the shot windows dropped",
                  "dropped": [best, best + drop - 1], "shot_perplexity": {str(s): round(v, 2) for s, v in ppl.items()}}


def _batch(ids: list[list[int]], idx: list[int], pad: int) -> dict[str, torch.Tensor]:
    enc = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
    return {k: torch.from_numpy(v) for k, v in pad_batch(enc, idx, ["input_ids", "attention_mask"], pad).items()}


def token_kd(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over real positions, x T^2."""
    logp_s = F.log_softmax(s / temperature, -1)
    logp_t = F.log_softmax(t / temperature, -1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1) * temperature ** 2


def hidden_pairs(keep: list[int], n_teacher: int) -> list[tuple[int, int]]:
    """Layer pairs to match. The last hidden state has the final norm applied, so the student's
    last block matches only the teacher's last block (never an un-normed middle one)."""
    n = len(keep)
    return [(s, t) for s, t in layer_map(keep) if (s == n - 1) == (t == n_teacher - 1)]


def distill_lm(teacher: LMModel, student: LMModel, transfer: TokenTransfer, keep: list[int], cfg: DistillConfig,
               seed: int, progress: Callable[[int, int, float], None] | None = None,
               validation: list[list[int]] | None = None) -> DistillStats:
    """KD on next-token distributions + hidden matching; early stopping on top-1 agreement."""
    cfg = cfg.resolved(temperature=LM_TEMPERATURE)
    cfg = dataclasses.replace(cfg, lr=cfg.lr or LM_LR)
    start_t = time.perf_counter()
    set_seed(seed)
    pad = student.tokenizer.pad_token_id
    model = student.module
    freeze_word_embeddings(student, False)  # the word table (tied to GPT-2's output layer) stays the teacher's
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = text_optimizer(params, cfg)
    n_teacher = len(teacher.layers())
    pairs = hidden_pairs(keep, n_teacher) if keep and cfg.hidden_weight > 0 else []
    v_ref = None
    if validation:
        v_ref = [next_tokens(teacher, validation, idx) for idx in _batches(validation, 32)]
    eval_at = {round(cfg.steps * (k + 1) / cfg.evals) for k in range(cfg.evals)} if v_ref else set()
    bf16 = use_bf16(cfg.bf16)
    sampler = EpochSampler(len(transfer), cfg.batch_size, np.random.default_rng(seed))
    totals = {"kd": 0.0, "hidden": 0.0}
    ema, best = math.nan, BestCheckpoint(cfg.steps)
    teacher.module.eval()
    model.train()
    for step in range(cfg.steps):
        idx = sampler.next()
        batch = _batch(transfer.ids, idx, pad)
        with torch.no_grad():
            t_out = teacher.module(**batch, output_hidden_states=bool(pairs))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch, output_hidden_states=bool(pairs))
        mask = batch["attention_mask"]
        loss = token_kd(out.logits.float(), t_out.logits.float(), mask, cfg.temperature)
        totals["kd"] += loss.item()
        if pairs:
            h = sum(hidden_loss(out.hidden_states[s + 1].float(), t_out.hidden_states[t + 1], mask)
                    for s, t in pairs) / len(pairs)
            loss = loss + cfg.hidden_weight * h
            totals["hidden"] += h.item()
        update(loss, opt, sched, params)
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        if step + 1 in eval_at:
            model.eval()
            hits = [(next_tokens(student, validation, idx) == r).compressed()
                    for idx, r in zip(_batches(validation, 32), v_ref)]
            agree = float(np.concatenate(hits).mean())
            model.train()
            best.check(step + 1, agree, model, agreement=agree)
        if progress:
            progress(step + 1, cfg.steps, ema)
    best.restore(model)
    model.eval()
    return DistillStats(steps=cfg.steps, transfer_size=len(transfer), seconds=time.perf_counter() - start_t,
                        final_loss=ema, losses={k: v / cfg.steps for k, v in totals.items()}, layer_map=pairs,
                        best_step=best.step, validation=best.curve, lr=text_lr(cfg))


def _batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    return length_sorted_batches({"input_ids": ids}, batch_size)


def next_tokens(model: LMModel, ids: list[list[int]], idx: list[int]) -> np.ma.MaskedArray:
    """The model's top-1 next token at every position of rows ``idx`` (padding masked)."""
    batch = _batch(ids, idx, model.tokenizer.pad_token_id)
    with torch.no_grad():
        top = model.module(**batch).logits.argmax(-1).numpy()
    return np.ma.masked_array(top, mask=batch["attention_mask"].numpy() == 0)


def generate(model_dir: str, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy generation from a compiled artifact directory (``model.onnx`` + tokenizer), one
    token per call with the key/value cache fed back: what an edge pipeline runs."""
    from pathlib import Path

    import onnxruntime as ort
    from transformers import AutoTokenizer

    from ..errors import InputError

    tok = AutoTokenizer.from_pretrained(model_dir)
    sess = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    caches = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    if not caches:
        raise InputError(f"{model_dir}: not a text-generation artifact (its model takes no key/value cache)")
    ids = np.array([tok(prompt)["input_ids"]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            **{c.name: np.zeros((1, c.shape[1], 0, c.shape[3]), np.float32) for c in caches}}
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, *present = sess.run(None, feed)
        token = int(logits[0, -1].argmax())
        if token == tok.eos_token_id:
            break
        new.append(token)
        feed = {"input_ids": np.array([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, feed["attention_mask"].shape[1] + 1), dtype=np.int64),
                **{c.name: p for c, p in zip(caches, present)}}
    return tok.decode(new)


# -- evaluation: per-token log-likelihoods, through any runner (PyTorch or the ONNX artifact)

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def torch_lm_runner(model: LMModel) -> Runner:
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model.module(input_ids=torch.from_numpy(batch["input_ids"]),
                                attention_mask=torch.from_numpy(batch["attention_mask"])).logits.float().numpy()
    return run


def feed(model: LMModel, ids: list[list[int]], idx: list[int], width: int | None = None) -> dict[str, np.ndarray]:
    """What the artifact takes for rows ``idx``: tokens, mask and empty caches (a prompt call)."""
    enc = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
    batch = pad_batch(enc, idx, ["input_ids", "attention_mask"], model.tokenizer.pad_token_id, width)
    return {**batch, **model.empty_cache(len(idx))}


@dataclass
class TokenScores:
    """Per evaluation window: log-likelihood of each true next token and the top-1 prediction."""

    logprob: list[np.ndarray]
    top1: list[np.ndarray]


def token_scores(runner: Runner, model: LMModel, ids: list[list[int]], batch_size: int = 16) -> TokenScores:
    logprob: list[np.ndarray] = [np.empty(0)] * len(ids)
    top1: list[np.ndarray] = [np.empty(0)] * len(ids)
    for idx in _batches(ids, batch_size):
        logits = torch.from_numpy(np.asarray(runner(feed(model, ids, idx)), dtype=np.float32))
        logp = torch.log_softmax(logits, -1)
        for r, i in enumerate(idx):
            n = len(ids[i])
            target = torch.tensor(ids[i][1:])
            logprob[i] = logp[r, :n - 1].gather(-1, target[:, None])[:, 0].numpy()
            top1[i] = logits[r, :n - 1].argmax(-1).numpy()
    return TokenScores(logprob, top1)


def lm_metrics(scores: TokenScores, ids: list[list[int]], reference: TokenScores | None = None) -> dict[str, float]:
    """Perplexity (exp of the mean negative log-likelihood per token), top-1 accuracy against the
    text, and top-1 agreement with the reference model (the teacher)."""
    lp = np.concatenate(scores.logprob)
    top = np.concatenate(scores.top1)
    truth = np.concatenate([np.asarray(x[1:]) for x in ids])
    out = {"perplexity": float(np.exp(-lp.mean())), "accuracy": float((top == truth).mean()),
           "tokens": len(lp), "n": len(ids)}
    if reference is not None:
        out["agreement"] = float((top == np.concatenate(reference.top1)).mean())
    return out


class TextGenerationTask:
    """The causal-LM adapter."""

    name = "text-generation"

    @staticmethod
    def eval_windows(d: Any) -> list[list[int]]:
        """The evaluation passages in windows of the length the student was distilled at."""
        return windows(d.student, [e.text for e in d.task.eval], d.task.info.get("window", 128))

    def distill_stage(self, cfg: CompileConfig, backend: Any, progress: Any):
        from ..checkpoint import checkpoint_dir, resume_or_distill
        from ..data.lm import load_lm_task
        from ..errors import InputError
        from ..models.lm import load_lm_teacher
        from ..models.text import parse_layers

        if cfg.embedding_rank or cfg.distill.unlabeled:
            raise InputError("--embedding-rank and --unlabeled apply to text classification only")
        cfg = dataclasses.replace(cfg, prune=cfg.prune_rate(LM_PRUNE))
        timings: dict[str, float] = {}
        set_seed(cfg.seed)
        length = cfg.distill.max_length
        with timed(timings, "load data", progress):
            task = load_lm_task(cfg.data, cfg.shots, cfg.seed, cfg.max_eval, cfg.text_column)
            task.info["window"] = length
        with timed(timings, "load teacher", progress):
            teacher = load_lm_teacher(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        shots = windows(teacher, [e.text for e in task.shots], length)
        if not shots:
            raise InputError("the shot passages tokenise to nothing")
        with timed(timings, "derive student", progress):
            selection: dict[str, Any] = {}
            if cfg.student:  # a pretrained student by name (distilgpt2): it must share the vocabulary
                student = load_lm_teacher(cfg.student, trust_remote_code=cfg.trust_remote_code)
                if student.config.vocab_size != teacher.config.vocab_size or \
                        student.tokenizer("a probe")["input_ids"] != teacher.tokenizer("a probe")["input_ids"]:
                    raise InputError(f"--student {cfg.student!r} does not share the teacher's vocabulary; "
                                     "next-token distillation needs the same tokenizer")
                keep: list[int] = []
            else:
                n = len(teacher.layers())
                # default: half the blocks (rounded down), chosen as a dropped run (see drop_block)
                plan = parse_layers(cfg.student_layers, n) if cfg.student_layers else max(1, n // 2)
                if isinstance(plan, int):
                    plan, selection = drop_block(teacher, shots, plan)
                student, keep = derive_lm_student(teacher, plan), plan
            student, unpruned = prepare(student, backend, cfg)
        per_shot = min(cfg.distill.augment, MAX_SAMPLES_PER_SHOT)
        with timed(timings, "teacher samples", progress):
            samples = teacher_samples(teacher, shots, per_shot * len(task.shots), cfg.seed, length,
                                      progress=lambda d, t: progress("teacher samples", d, t, ""))
            transfer = TokenTransfer(shots + samples, ["shot"] * len(shots) + ["teacher-sample"] * len(samples))
        ckpt = checkpoint_dir(cfg, backend)
        with timed(timings, "distill", progress):
            def train() -> DistillStats:
                val = teacher_samples(teacher, shots, 64, cfg.seed + 7919, length) if cfg.distill.evals else None
                dcfg = cfg.distill.resolved(lm_steps(teacher.num_parameters(), cfg.distill.batch_size))
                return distill_lm(teacher, student, transfer, keep, dcfg, cfg.seed,
                                  lambda d, t, loss: progress("distill", d, t, f"loss {loss:.4f}"), val)

            student, stats = resume_or_distill(ckpt, student, progress, train)
        student.info["layers_kept"] = keep
        student.info["layer_selection"] = selection or None
        return Distilled(task, teacher, student, keep, transfer, stats, None, unpruned, timings, ckpt)

    def retarget(self, d: Distilled, backend: Any, cfg: CompileConfig, steps: int, progress: Progress) -> Distilled:
        return d  # pruned in its own compile only, like QA

    def calibration(self, d: Any, cfg: CompileConfig) -> CalibrationSet:
        """Shots and teacher samples, padded to one width (histogram calibrators need equal shapes):
        a seeded half (at most 64) calibrates, others validate."""
        width = max(len(x) for x in d.transfer.ids)

        def batches(idx: list[int]) -> Batches:
            return [feed(d.student, d.transfer.ids, idx[s:s + 8], width) for s in range(0, len(idx), 8)]

        return from_transfer(len(d.transfer), batches, cfg.seed, n_calibrate=64, n_validate=64)

    def evaluate(self, d: Any, runner: Any, cfg: CompileConfig) -> dict[str, Any]:
        ids = self.eval_windows(d)
        ref = token_scores(torch_lm_runner(d.teacher), d.teacher, ids)
        stu = token_scores(torch_lm_runner(d.student), d.student, ids)
        art = token_scores(runner, d.student, ids)
        return {"teacher": lm_metrics(ref, ids, ref), "student": lm_metrics(stu, ids, ref),
                "artifact": lm_metrics(art, ids, ref)}

    def input_size(self, d: Any, cfg: CompileConfig) -> tuple[int, int, int | None]:
        ids = self.eval_windows(d)
        length = min(cfg.seq_len, getattr(d.student.config, "n_positions", None)
                     or getattr(d.student.config, "max_position_embeddings", cfg.seq_len))
        return d.teacher.config.vocab_size, length, int(np.median([len(x) for x in ids]))

    def predictions(self, d: Any, runner: Any, model: LMModel) -> TokenScores:
        """``model``'s token scores on the evaluation passages, through ``runner`` (None: in PyTorch)."""
        return token_scores(runner or torch_lm_runner(model), model, self.eval_windows(d))

    def score(self, d: Any, preds: TokenScores, reference: TokenScores) -> dict[str, Any]:
        return lm_metrics(preds, self.eval_windows(d), reference)
