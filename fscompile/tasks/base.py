"""The task-adapter protocol and what every task's stages share: the distilled state one
target build starts from (:class:`Distilled`), stage timing, and the target's sparsity step."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..backends import Backend
from ..calibration import CalibrationSet
from ..config import CompileConfig, DistillConfig
from ..distill import DistillStats

# progress(stage, done, total, detail): the CLI draws bars, the API may pass None.
Progress = Callable[[str, int, int, str], None]


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str, progress: Progress) -> Iterator[None]:
    """Time one stage into ``timings`` and tell ``progress`` when it starts and ends."""
    progress(name, 0, 1, "")
    t = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t, 2)
    progress(name, 1, 1, "")


@dataclass
class Distilled:
    """Everything up to and including distillation: what every target build starts from."""

    task: Any  # TaskData | ImageTaskData | QATaskData | LMTaskData
    teacher: Any  # TextModel | ImageModel | QAModel | LMModel
    student: Any
    keep: list[int]
    transfer: Any  # the transfer set; None for images (views are drawn on the fly)
    stats: DistillStats
    adaptation: dict[str, Any] | None
    unpruned: Any | None
    timings: dict[str, float]
    checkpoint: Path | None = None
    sources: dict[str, Any] | None = None  # what the student learnt from (counts per origin, generator)
    # what a text task read of the teacher on the evaluation rows, by (reading, max_length): one teacher, one
    # set of rows for every target, fallback variant and peer of a distillation, and every trial of a search
    teacher_readings: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict)

    @property
    def teacher_temperature(self) -> float | None:
        """The temperature that calibrates a head fitted here on the shots, for the label-free retention
        estimate (None: the teacher came with its own head, read at the estimate's default)."""
        return (self.adaptation or {}).get("temperature")


def prepare(student: Any, backend: Backend | None, cfg: CompileConfig) -> tuple[Any, Any | None]:
    """``student`` with ``backend``'s sparsity pattern, and an unpruned copy for verification.
    Applied before distillation, which then serves as the recovery (masks fixed)."""
    if backend is None:
        return student, None
    unpruned = copy.deepcopy(student) if cfg.prune_rate() > 0 else None
    return backend.prepare(student, cfg.recipe()), unpruned


def recovered(d: Distilled, backend: Backend, cfg: CompileConfig, steps: int, progress: Progress,
              train: Callable[[Any, DistillConfig], Any]) -> Distilled:
    """A copy of a target-agnostic ``d`` with ``backend``'s sparsity pattern and ``steps`` of
    recovery training (``train(student, distill_config)``, masks fixed): one distillation, many targets."""
    if cfg.prune_rate() <= 0:
        return d
    student = backend.prepare(copy.deepcopy(d.student), cfg.recipe())
    timings = dict(d.timings)
    with timed(timings, "recover", progress):
        train(student, dataclasses.replace(cfg.distill, steps=steps, evals=0))
    return dataclasses.replace(d, student=student, unpruned=d.student, timings=timings)


class TaskAdapter(Protocol):
    """What differs between tasks, behind one interface (see ``fscompile.tasks``)."""

    name: str

    def distill_stage(self, cfg: CompileConfig, backend: Backend | None, progress: Progress) -> Distilled:
        """Load data and teacher, adapt it, derive the student, apply ``backend``'s sparsity, distil."""

    def retarget(self, d: Distilled, backend: Backend, cfg: CompileConfig, steps: int,
                 progress: Progress) -> Distilled:
        """``d`` made ready for ``backend`` (its sparsity and a short recovery), or ``d`` itself."""

    def calibration(self, d: Distilled, cfg: CompileConfig) -> CalibrationSet:
        """Inputs that calibrate INT8 and choose between the target's variants."""

    def evaluate(self, d: Distilled, runner: Any, cfg: CompileConfig) -> dict[str, Any]:
        """Metrics of teacher, student and artifact (``runner``) on the evaluation rows."""

    def input_size(self, d: Distilled, cfg: CompileConfig) -> tuple[int, int, int | None]:
        """(vocabulary, profiling length, real median length) that profiling feeds."""

    def predictions(self, d: Distilled, runner: Any, model: Any) -> Any:
        """``model``'s outputs on the evaluation rows through ``runner`` (None: in PyTorch)."""

    def score(self, d: Distilled, preds: Any, reference: Any) -> dict[str, Any]:
        """Metrics of ``preds`` against the labels and a ``reference`` model's outputs."""
