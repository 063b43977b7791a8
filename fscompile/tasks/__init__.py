"""Task adapters: what differs between tasks, behind one small interface, so that the same
CLI, backends, calibration, profiling and report serve all of them. A new task is one new
adapter (one module here) plus a model class with the backends' interface (see ``models``).

An adapter (:class:`~fscompile.tasks.base.TaskAdapter`) provides:
  ``distill_stage(cfg, backend, progress) -> Distilled``   load, adapt, derive, prepare, distil
  ``retarget(d, backend, cfg, steps, progress)``         another target's sparsity + a short recovery
  ``calibration(d, cfg) -> CalibrationSet``               inputs that calibrate and choose INT8
  ``evaluate(d, runner, cfg) -> metrics``                 teacher / student / artifact
  ``input_size(d, cfg) -> (vocab, length, real_length)``  what profiling feeds
  ``predictions(d, runner, model)``, ``score(d, preds, reference)``  any model's outputs and metrics
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import CompileConfig
from .base import Distilled, Progress, TaskAdapter, timed


def task_name(cfg: CompileConfig) -> str:
    """``cfg.task``, or from the teacher: torchvision names, ``--weights`` and directories of
    earlier image runs are image classification; local models with a span head are question
    answering (a Hub id needs ``--task question-answering``); local causal LMs, known causal-LM
    Hub names (GPT-2, SmolLM2, Llama, Qwen, Mistral), ``smollm2`` and ``.gguf`` files are text
    generation; everything else is text classification."""
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
        from ..models.lm import is_lm_spec

        if is_lm_spec(cfg.teacher):
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
    from .text import TextClassificationTask

    return TextClassificationTask()


__all__ = ["Distilled", "Progress", "TaskAdapter", "get_task", "task_name", "timed"]
