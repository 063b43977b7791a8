"""Few-shot knowledge distillation: the part no library does.

The teacher labels a transfer set grown from the shots (augmented variants, optional
unlabeled text); the student matches the teacher's softened logits and, layer by layer,
its hidden states and attention distributions (TinyBERT/MiniLM style).
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .augment import TransferSet
from .config import DEFAULT_STEPS, DistillConfig
from .data.batching import length_sorted_batches, pad_batch
from .models.text import TextModel

# Text steps: the default 1000 while the transfer inputs average up to STEP_TOKENS tokens; longer inputs
# get as many steps as 1000 batches of STEP_TOKENS-token inputs hold (a step costs its tokens), at least
# MIN_STEPS. On 146-token paragraphs 1000 steps took 151 s of a 497 s compile.
STEP_TOKENS = 48
MIN_STEPS = 300
TEXT_LR = 5e-5  # the experiment plan's rate: the student starts from the teacher's own layers
POOL_LR = 2e-4  # with --unlabeled text: +0.6 to +1.2 points over 5e-5 on SST-2, 5 draws (README)


@dataclass
class DistillStats:
    steps: int
    transfer_size: int
    seconds: float
    final_loss: float
    losses: dict[str, float] = field(default_factory=dict)
    layer_map: list[tuple[int, int]] = field(default_factory=list)
    best_step: int = 0
    validation: list[dict[str, float]] = field(default_factory=list)
    resumed_from: str | None = None
    lr: float | None = None  # the peak learning rate used (--lr or the task's default)
    teacher_seconds: float | None = None  # of ``seconds``, the teacher labelling the transfer set


class BestCheckpoint:
    """Early stopping's memory: the weights at the best validation score seen so far (any
    comparable score), the step they came from, and the curve of every check."""

    def __init__(self, steps: int) -> None:
        self.score: Any = None
        self.step, self.state, self.curve = steps, None, []

    def check(self, step: int, score: Any, model: torch.nn.Module, **record: float) -> None:
        self.curve.append({"step": step, **record})
        if self.score is None or score > self.score:
            self.score, self.step = score, step
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: torch.nn.Module) -> bool:
        """Load the best weights into ``model``; False when no check ran."""
        if self.state is not None:
            model.load_state_dict(self.state)
        return self.state is not None


def text_lr(cfg: DistillConfig) -> float:
    """--lr, else 5e-5 on a transfer set grown from the shots alone, 2e-4 with --unlabeled text:
    many real inputs let the student move further from the teacher's layers without fitting the
    shots, where on augmented shots alone the higher rate gained nothing."""
    if cfg.lr is not None:
        return cfg.lr
    return POOL_LR if cfg.unlabeled else TEXT_LR


def text_optimizer(params: list[torch.nn.Parameter], cfg: DistillConfig) -> tuple[Any, Any]:
    """AdamW (weight decay 0.01) with a linear warm-up over the first 10% of steps, then linear
    decay: the schedule of every transformer student (classification, QA, generation)."""
    # fused: one kernel over all tensors instead of a Python loop per parameter (~10% of a step)
    opt = torch.optim.AdamW(params, lr=text_lr(cfg), weight_decay=0.01, fused=True)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))))
    return opt, sched


class EpochSampler:
    """Index batches, epoch-style: every example once before any repeats (drawn from ``gen``).

    With ``lengths``, each window of ``window`` batches is sorted by length before it is cut
    into batches, and those batches are shuffled: batches of similar lengths pad far less
    (217 instead of 588 tokens per batch of 16 on SST-2), while which examples meet in an
    epoch stays random (the bucketing of Hugging Face's ``group_by_length``)."""

    def __init__(self, n: int, batch_size: int, gen: np.random.Generator,
                 lengths: list[int] | None = None, window: int = 50) -> None:
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.lengths = np.asarray(lengths) if lengths is not None else None
        self.window = window
        self.batches: list[list[int]] = []
        self.order: list[int] = []

    def next(self) -> list[int]:
        if self.lengths is not None:
            if not self.batches:
                self._refill()
            return self.batches.pop()
        if len(self.order) < self.batch_size:
            self.order.extend(self.gen.permutation(self.n).tolist())
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return idx

    def _refill(self) -> None:
        order = self.gen.permutation(self.n)
        span = self.batch_size * self.window
        for s in range(0, self.n, span):
            win = order[s:s + span]
            win = win[np.argsort(self.lengths[win], kind="stable")]
            self.batches.extend(win[i:i + self.batch_size].tolist() for i in range(0, len(win), self.batch_size))
        self.batches = [self.batches[i] for i in self.gen.permutation(len(self.batches))]


def text_steps(lengths: list[int]) -> int:
    """The default step count for transfer inputs of these token ``lengths`` (see STEP_TOKENS)."""
    mean = sum(lengths) / max(1, len(lengths))
    return max(MIN_STEPS, min(DEFAULT_STEPS, round(DEFAULT_STEPS * STEP_TOKENS / max(1.0, mean))))


def update(loss: torch.Tensor, opt: Any, sched: Any, params: list[torch.nn.Parameter]) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Batcher:
    """Pre-tokenised texts, padded per batch to the longest member (dynamic padding)."""

    def __init__(self, model: TextModel, texts: list[str], pairs: list[str] | None, max_length: int) -> None:
        self.enc = model.tokenizer(texts, pairs, truncation=True, max_length=max_length)
        self.names = model.input_names
        self.pad_id = model.tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.enc["input_ids"])

    def batch(self, idx) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in pad_batch(self.enc, idx, self.names, self.pad_id).items()}


class TeacherCache:
    """The teacher's logits, and hidden states of the layers the student matches, for every
    transfer example: computed once, so a training step costs only the student's passes.
    Hidden states are kept per example at their own length, in fp16."""

    def __init__(self, teacher: TextModel, batcher: Batcher, layers: list[int], batch_size: int = 64,
                 bf16: bool = False) -> None:
        self.layers = layers
        self.logits = torch.empty(0)
        self.hidden: list[list[torch.Tensor]] = [[torch.empty(0)] * len(batcher) for _ in layers]
        teacher.module.eval()
        # bf16 nearly halves the teacher's time over a large pool (3,000 SST-2 texts: 4.2 -> 2.3 s)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for idx in length_sorted_batches(batcher.enc, batch_size):
                b = batcher.batch(idx)
                out = teacher.module(**b, output_hidden_states=bool(layers))
                if not len(self.logits):
                    self.logits = torch.empty(len(batcher), out.logits.shape[-1])
                self.logits[idx] = out.logits.float()
                lengths = b["attention_mask"].sum(1).tolist()
                for j, layer in enumerate(layers):
                    h = out.hidden_states[layer + 1].half()
                    for r, (i, n) in enumerate(zip(idx, lengths)):
                        self.hidden[j][i] = h[r, :n].clone()

    def hidden_batch(self, j: int, idx: list[int], width: int) -> torch.Tensor:
        """Layer ``j``'s cached states for ``idx``, zero-padded to ``width`` tokens."""
        h = self.hidden[j]
        out = torch.zeros(len(idx), width, h[idx[0]].shape[-1])
        for r, i in enumerate(idx):
            out[r, :len(h[i])] = h[i].float()
        return out


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(teacher || student) on temperature-softened distributions, times T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def hidden_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between hidden states over real (unpadded) tokens, scaled by the
    teacher's per-layer variance so every layer weighs the same."""
    m = mask.unsqueeze(-1).to(s_hidden.dtype)
    err = ((s_hidden - t_hidden) ** 2 * m).sum() / (m.sum() * s_hidden.shape[-1])
    var = ((t_hidden - (t_hidden * m).sum((0, 1)) / m.sum()) ** 2 * m).sum() / (m.sum() * t_hidden.shape[-1])
    return err / var.clamp(min=1e-6)


def attention_loss(s_att: torch.Tensor, t_att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL between teacher and student attention distributions, per head and real query (of
    the heads' mean where the student's heads were pruned and no longer pair up)."""
    if s_att.shape[1] != t_att.shape[1]:
        s_att, t_att = s_att.mean(1, keepdim=True), t_att.mean(1, keepdim=True)
    eps = 1e-9
    kl = (t_att * ((t_att + eps).log() - (s_att + eps).log())).sum(-1)  # [B, H, Q]
    q = mask.unsqueeze(1).to(kl.dtype)
    return (kl * q).sum() / (q.sum() * kl.shape[1])


def layer_map(keep: list[int]) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: each kept layer matches the teacher layer it came from."""
    return list(enumerate(keep))


def _agreement(model: TextModel, batcher: Batcher, t_logits: torch.Tensor) -> tuple[float, float]:
    """(agreement with the teacher's argmax, mean KL at T=1) on a validation transfer set."""
    agree, kl, n = 0.0, 0.0, 0
    with torch.no_grad():
        for idx in length_sorted_batches(batcher.enc, 64):
            logits = model.module(**batcher.batch(idx)).logits
            agree += (logits.argmax(-1) == t_logits[idx].argmax(-1)).sum().item()
            kl += kd_loss(logits, t_logits[idx], 1.0).item() * len(idx)
            n += len(idx)
    return agree / n, kl / n


def use_bf16(setting: str) -> bool:
    """bf16 autocast for the student's passes: "on", "off", or "auto" = where the CPU has
    native bf16 matrix units (AMX-BF16 / AVX512-BF16), which make training ~1.5x faster."""
    if setting in ("on", "off"):
        return setting == "on"
    from .profile import cpu_info

    isa = cpu_info()["isa"]
    return bool(isa.get("amx_bf16") or isa.get("avx512_bf16"))


def set_dropout(model: torch.nn.Module, p: float | list[float] | None) -> list[float]:
    """Set every dropout layer's rate (one rate, one per layer as returned, or None to leave
    them); returns the rates they had. Attention dropout reads its module's rate too."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    before = [m.p for m in layers]
    if p is not None:
        for m, r in zip(layers, p if isinstance(p, list) else [p] * len(layers)):
            m.p = r
    return before


def freeze_word_embeddings(student: TextModel, train: bool) -> None:
    """Keep the vocabulary x hidden table fixed: the shots touch a few hundred of its rows, so
    training it moves only those away from the rest (hurting unseen words), and its dense
    gradient and optimizer update would cost more than the layers themselves. A factorised
    table keeps its small up-projection trainable."""
    from .models.text import FactorizedEmbedding

    emb = student.module.base.get_input_embeddings()
    table = emb.low if isinstance(emb, FactorizedEmbedding) else emb
    for p in table.parameters():
        p.requires_grad_(train)


def mixup_loss(teacher: TextModel, student: TextModel, batcher: Batcher, idx: list[int],
               gen: np.random.Generator, pairs: list[tuple[int, int]], cfg: DistillConfig) -> torch.Tensor:
    """KD on word-embedding mixtures of two transfer examples (MixKD-style): inputs between
    the few shots, where the teacher's decision boundary lies. Each model mixes its own
    embeddings; the teacher runs on the fly since these inputs exist only in this step."""
    other = gen.permutation(idx).tolist()
    both = batcher.batch(idx + other)
    n = len(idx)
    lam = float(gen.beta(0.4, 0.4))
    mask = torch.maximum(both["attention_mask"][:n], both["attention_mask"][n:])
    extra = {"token_type_ids": both["token_type_ids"][:n]} if "token_type_ids" in both else {}

    def mixed(model: TextModel) -> torch.Tensor:
        e = model.module.base.get_input_embeddings()(both["input_ids"])
        return lam * e[:n] + (1 - lam) * e[n:]

    with torch.no_grad():
        t_out = teacher.module(inputs_embeds=mixed(teacher), attention_mask=mask,
                               output_hidden_states=cfg.hidden_weight > 0, **extra)
    s_out = student.module(inputs_embeds=mixed(student), attention_mask=mask,
                           output_hidden_states=cfg.hidden_weight > 0, **extra)
    loss = kd_loss(s_out.logits, t_out.logits, cfg.temperature)
    if cfg.hidden_weight > 0:
        loss = loss + cfg.hidden_weight * sum(
            hidden_loss(s_out.hidden_states[s + 1], t_out.hidden_states[t + 1], mask) for s, t in pairs) / len(pairs)
    return loss


def distill(teacher: TextModel, student: TextModel, transfer: TransferSet, keep: list[int],
            cfg: DistillConfig, seed: int, progress: Callable[[int, int, float], None] | None = None,
            validation: TransferSet | None = None) -> DistillStats:
    """Train ``student`` in place on the transfer set; returns what happened.

    With ``validation`` (inputs the student never trains on), agreement with the teacher is
    checked ``cfg.evals`` times and the best checkpoint is kept (early stopping without
    spending any labelled shot on validation: the teacher labels the validation inputs).
    """
    import time

    start = time.perf_counter()
    set_seed(seed)
    pairs = layer_map(keep)
    bf16 = use_bf16(cfg.bf16)
    batcher = Batcher(student, transfer.texts, transfer.pairs, cfg.max_length)
    cfg = cfg.resolved(text_steps([len(x) for x in batcher.enc["input_ids"]]))
    cache = TeacherCache(teacher, batcher, [t for _, t in pairs] if cfg.hidden_weight > 0 else [], bf16=bf16)
    t_logits = cache.logits
    if validation is not None:
        v_batcher = Batcher(student, validation.texts, validation.pairs, cfg.max_length)
        v_logits = TeacherCache(teacher, v_batcher, [], bf16=bf16).logits
    teacher_s = time.perf_counter() - start
    use_attention = cfg.attention_weight > 0
    masks = student.info.get("masks", {})

    model = student.module
    model.train()
    dropout = set_dropout(model, None if cfg.dropout else 0.0)
    freeze_word_embeddings(student, cfg.train_embeddings)
    params = [p for p in model.parameters() if p.requires_grad]
    masked = [(p, masks[n]) for n, p in model.named_parameters() if n in masks]  # looked up once, not per step
    opt, sched = text_optimizer(params, cfg)
    gen = np.random.default_rng(seed)
    sampler = EpochSampler(len(batcher), cfg.batch_size, gen, [len(x) for x in batcher.enc["input_ids"]])
    totals = {"kd": 0.0, "hidden": 0.0, "attention": 0.0}
    ema = math.nan
    eval_at = {round(cfg.steps * (k + 1) / cfg.evals) for k in range(cfg.evals)} if validation else set()
    best = BestCheckpoint(cfg.steps)
    for step in range(cfg.steps):
        idx = sampler.next()
        batch = batcher.batch(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch, output_hidden_states=cfg.hidden_weight > 0, output_attentions=use_attention)
        loss = kd_loss(out.logits.float(), t_logits[idx], cfg.temperature)
        totals["kd"] += loss.item()
        mask = batch["attention_mask"]
        if cfg.hidden_weight > 0:
            width = mask.shape[1]
            h = sum(hidden_loss(out.hidden_states[s + 1].float(), cache.hidden_batch(j, idx, width), mask)
                    for j, (s, _) in enumerate(pairs)) / len(pairs)
            loss = loss + cfg.hidden_weight * h
            totals["hidden"] += h.item()
        if use_attention:  # attention maps are too large to cache: the teacher runs again
            with torch.no_grad():
                t_att = teacher.module(**batch, output_attentions=True).attentions
            a = sum(attention_loss(out.attentions[s].float(), t_att[t], mask) for s, t in pairs) / len(pairs)
            loss = loss + cfg.attention_weight * a
            totals["attention"] += a.item()
        if cfg.mixup > 0 and gen.random() < cfg.mixup:
            loss = loss + mixup_loss(teacher, student, batcher, idx, gen, pairs, cfg)
        update(loss, opt, sched, params)
        if masked:  # sparsity patterns stay fixed through the (recovery) distillation
            with torch.no_grad():
                for p, m in masked:
                    p.mul_(m)
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        if step + 1 in eval_at:
            model.eval()
            agree, kl = _agreement(student, v_batcher, v_logits)
            model.train()
            best.check(step + 1, (agree, -kl), model, agreement=agree, kl=kl)
        if progress:
            progress(step + 1, cfg.steps, ema)
    best.restore(model)
    set_dropout(model, dropout)
    model.eval()
    return DistillStats(steps=cfg.steps, transfer_size=len(transfer), seconds=time.perf_counter() - start,
                        final_loss=ema, losses={k: v / cfg.steps for k, v in totals.items()},
                        layer_map=pairs, best_step=best.step, validation=best.curve, lr=text_lr(cfg),
                        teacher_seconds=round(teacher_s, 2))
