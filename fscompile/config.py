"""Frozen, side-effect-free configuration of one compile."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Defaults follow the experiment plan (DESIGN.md): lr 5e-5, batch 16, 1000 steps,
# temperature 2.0, pruning rate 0.2, 8 bits, seed 0.
TEACHER_ALIASES: dict[str, str] = {
    "bert-base": "bert-base-uncased",
    "distilbert": "distilbert-base-uncased",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
}


TASKS = ("auto", "text-classification", "image-classification", "question-answering", "text-generation")


DEFAULT_STEPS = 1000
DEFAULT_TEMPERATURE = 2.0
DEFAULT_PRUNE = 0.2  # the experiment plan's rate


@dataclass(frozen=True)
class DistillConfig:
    """Few-shot distillation hyper-parameters."""

    steps: int | None = None  # None = DEFAULT_STEPS, fewer for long text inputs (distill.text_steps)
    steps_scale: float = 1.0  # multiplies the derived step count (not --steps); the budget search tries 2
    lr: float | None = None  # None = the task's default (5e-5 text, 2e-4 with unlabeled text, 1e-3 image students)
    batch_size: int = 16
    temperature: float | None = None  # None = DEFAULT_TEMPERATURE, or the task's own (next-token KD: 1.0)
    augment: int = 100  # augmented variants per shot in the transfer set
    hidden_weight: float = 1.0  # weight of hidden-state matching (0 = logits only)
    attention_weight: float = 0.0  # weight of attention-distribution matching (off: no gain measured)
    bf16: str = "auto"  # bf16 autocast while training: auto (where the CPU has bf16 units), on, off
    train_embeddings: bool = False  # train the word-embedding table too (slower, overfits the shots)
    dropout: bool = False  # the student's dropout while distilling text classifiers
    mixup: float = 0.0  # share of steps that add a KD loss on embedding-space mixtures
    evals: int = 5  # validation checks for early stopping (0 = keep the last step)
    unlabeled: str | None = None  # optional pool of raw text: a file, a directory or a Hub dataset
    generator: str = "smollm2"  # causal LM that writes in-domain inputs for the transfer set ("none": off)
    generate: int | None = None  # how many texts it writes (None: derived from the shots' length, see generate.py)
    ops: str = "mask,drop,swap,mix,crop,vocab"  # augmentations, cycled over the variants
    max_length: int = 128

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.steps_scale <= 100:
            raise ValueError(f"steps_scale must be in (0, 100], got {self.steps_scale}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError("--lr must be > 0")
        # below ~0.1 the softened distributions are one-hot and the KD gradients overflow (NaN weights)
        if self.temperature is not None and not 0.1 <= self.temperature <= 100:
            raise ValueError(f"--temperature must be in [0.1, 100], got {self.temperature}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be auto, on or off, got {self.bf16!r}")
        if self.augment < 0:
            raise ValueError(f"augment must be >= 0, got {self.augment}")
        if self.generate is not None and self.generate < 0:
            raise ValueError(f"--generate must be >= 0, got {self.generate}")
        if not self.generator:
            raise ValueError("--generator must name a model, or none")
        from .augment import OPS

        unknown = [o for o in self.ops.split(",") if o not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"--augment-ops: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(OPS)} "
                             "(comma-separated, cycled over the variants; repeat one to weight it)")

    def resolved(self, derived: int | None = None, temperature: float = DEFAULT_TEMPERATURE) -> DistillConfig:
        """This config with its step count settled (``--steps``, else ``derived``, the task's rule,
        else :data:`DEFAULT_STEPS`, times ``steps_scale``) and its temperature (``--temperature``, else
        the task's)."""
        steps = self.steps or max(1, round(self.steps_scale * (derived or DEFAULT_STEPS)))
        return dataclasses.replace(self, steps=steps,
                                   temperature=self.temperature or temperature)


@dataclass(frozen=True)
class Recipe:
    """What the pipeline asks of a backend's ``prepare`` (sparsity) and ``compile`` steps."""

    prune: float = 0.0
    prune_heads: bool = False  # CPU targets: whole attention heads too, not only FFN channels
    seed: int = 0
    seq_len: int = 128
    calibration: str = "auto"
    embedding_bits: int = 8  # 4: the word-embedding table block-quantized to 4 bits
    variant: str | None = None  # build only this INT8 candidate (verification's unpruned twin: latency only)
    # a budget search's (size MB, batch-1 ms): variants over them are not shipped while another is within
    variant_limits: tuple[float | None, float | None] = (None, None)


@dataclass(frozen=True)
class CompileConfig:
    """Everything that determines one compile; recorded in the manifest."""

    teacher: str = "minilm"
    data: str | None = None  # None = the embedded default set
    task: str = "auto"  # text-classification | image-classification | question-answering | text-generation | auto
    student: str | None = None  # image tasks: torchvision architecture; text generation: a pretrained LM
    weights: str | None = None  # image tasks: a local state dict for the teacher architecture
    image_size: int | None = None  # image tasks: input side in pixels (default: the teacher's, else the data's)
    mean: tuple[float, ...] | None = None  # image tasks: the teacher's input normalisation (default: ImageNet's)
    std: tuple[float, ...] | None = None
    target: str = "ort-int8"
    shots: int = 10
    seed: int = 0
    student_layers: str | None = None  # "0,2,4", a count "3", or None = every other layer
    prune: float | None = None  # pruning rate in the pattern the target accelerates; None = the task's (prune_rate)
    # CPU targets: whole attention heads too. Off by default: on SST-2 it cost 1.7 points for ~5% latency (README)
    prune_heads: bool = False
    embedding_rank: int = 0  # low-rank word embeddings (0 = keep them full)
    embedding_bits: int = 8  # word-embedding table bits in the artifact (4 = block-wise, ~half the size)
    bits: int = 8
    seq_len: int = 128  # profiling sequence length
    profile_seconds: float = 3.0  # time budget per model and batch size when profiling
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    max_eval: int | None = None
    calibration: str = "auto"  # static INT8 calibration: auto|minmax|entropy|percentile
    trust_remote_code: bool = False
    export_only: bool = False  # build a target's portable files even where it cannot run
    fallback: bool = False  # ship the better variant when the artifact fails verification
    tolerance: float = 0.01  # accuracy the artifact may lose against the fp32 student
    variant_limits: tuple[float | None, float | None] = (None, None)  # set by the budget search (Recipe's)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise ValueError(f"--shots must be >= 1, got {self.shots}")
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise ValueError(f"--prune must be in [0, 1), got {self.prune}")
        if self.embedding_rank < 0:
            raise ValueError(f"--embedding-rank must be >= 0, got {self.embedding_rank}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.image_size is not None and not 8 <= self.image_size <= 2048:
            raise ValueError(f"--image-size must be in [8, 2048], got {self.image_size}")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v is not None and (len(v) != 3 or (name == "std" and min(v) <= 0)):
                raise ValueError(f"{name} must be three numbers (R, G, B){', all > 0' if name == 'std' else ''}, "
                                 f"got {v}")
        if self.embedding_bits not in (4, 8):
            raise ValueError(f"--embedding-bits must be 4 or 8, got {self.embedding_bits}")
        if self.bits != 8:
            raise ValueError(f"--bits: only 8 is supported, got {self.bits}")
        if self.seq_len < 8:
            raise ValueError(f"--seq-len must be >= 8, got {self.seq_len}")
        if self.calibration not in ("auto", "minmax", "entropy", "percentile"):
            raise ValueError(f"--calibration must be auto, minmax, entropy or percentile, got {self.calibration!r}")
        if self.max_eval is not None and self.max_eval < 1:
            raise ValueError(f"--max-eval must be >= 1, got {self.max_eval}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash identifying the run (same config => same fingerprint)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def prune_rate(self, task_default: float = DEFAULT_PRUNE) -> float:
        """``--prune``, else the task's default (the plan's 0.2; text generation 0, see tasks/lm.py)."""
        return self.prune if self.prune is not None else task_default

    def recipe(self) -> Recipe:
        """What this compile asks of the target's ``prepare`` and ``compile`` steps."""
        return Recipe(prune=self.prune_rate(), prune_heads=self.prune_heads, seed=self.seed, seq_len=self.seq_len,
                      calibration=self.calibration, embedding_bits=self.embedding_bits,
                      variant_limits=self.variant_limits)

    def run_name(self) -> str:
        teacher = self.teacher.rstrip("/").split("/")[-1] or "teacher"
        return f"{teacher}-{self.target}-{self.shots}shot-seed{self.seed}"
