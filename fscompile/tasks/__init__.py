"""Task adapters: what differs between tasks, behind one small interface, so that the same
CLI, backends, calibration, profiling and report serve all of them. A new task is one new
adapter (one module here) plus a model class with the backends' interface (see ``models``).

An adapter provides:
  ``distill_stage(cfg, backend, progress) -> Distilled``   load, adapt, derive, prepare, distil
  ``calibration(d, cfg) -> CalibrationSet``               inputs that calibrate and choose INT8
  ``evaluate(d, runner, cfg) -> metrics``                 teacher / student / artifact
  ``input_size(d, cfg) -> (vocab, length, real_length)``  what profiling feeds
  ``predictions(d, runner, model)``, ``score(d, preds, reference)``  any model's outputs and metrics
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..calibration import CalibrationSet
from ..config import CompileConfig
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

    task: Any  # TaskData | ImageTaskData
    teacher: Any  # TextModel | ImageModel
    student: Any
    keep: list[int]
    transfer: Any  # the text transfer set; None for images (views are drawn on the fly)
    stats: DistillStats
    adaptation: dict[str, Any] | None
    unpruned: Any | None
    timings: dict[str, float]
    checkpoint: Path | None = None
    kind: str = "text-classification"


class TaskAdapter(Protocol):
    name: str

    def distill_stage(self, cfg: CompileConfig, backend: Any, progress: Any) -> Distilled: ...

    def calibration(self, d: Distilled, cfg: CompileConfig) -> CalibrationSet: ...

    def evaluate(self, d: Distilled, runner: Any, cfg: CompileConfig) -> dict[str, Any]: ...

    def input_size(self, d: Distilled, cfg: CompileConfig) -> tuple[int, int, int | None]: ...

    def predictions(self, d: Distilled, runner: Any, model: Any) -> Any: ...

    def score(self, d: Distilled, preds: Any, reference: Any) -> dict[str, Any]: ...


def task_name(cfg: CompileConfig) -> str:
    """``cfg.task``, or from the teacher: torchvision names, ``--weights`` and directories of
    earlier image runs are image classification; local models with a span head are question
    answering (a Hub id needs ``--task question-answering``); local causal LMs and GPT-2-family
    Hub names are text generation; everything else is text classification."""
    if cfg.task != "auto":
        return cfg.task
    from ..models.vision import is_vision_teacher

    if is_vision_teacher(cfg.teacher, cfg.weights):
        return "image-classification"
    config = Path(cfg.teacher).expanduser() / "config.json"
    if config.is_file():  # a local model with a span head: question answering
        try:
            archs = json.loads(config.read_text()).get("architectures") or []
        except (OSError, ValueError):
            archs = []
        if any(str(a).endswith("ForQuestionAnswering") for a in archs):
            return "question-answering"
        if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            return "text-generation"
    else:
        from ..models.lm import KNOWN_LM_PREFIXES

        if cfg.teacher.startswith(KNOWN_LM_PREFIXES):
            return "text-generation"
    return "text-classification"


def get_task(cfg: CompileConfig) -> TaskAdapter:
    name = task_name(cfg)
    if name == "image-classification":
        from .vision import ImageClassificationTask

        return ImageClassificationTask()
    if name == "question-answering":
        from .qa import QuestionAnsweringTask

        return QuestionAnsweringTask()
    if name == "text-generation":
        from .lm import TextGenerationTask

        return TextGenerationTask()
    from ..pipeline import TextClassificationTask

    return TextClassificationTask()
