"""Checkpoints of the distilled student, so an interrupted compile resumes after distillation."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .backends import Backend
from .config import CompileConfig
from .distill import DistillStats
from .models import load_any
from .report import write_json


def checkpoint_dir(cfg: CompileConfig, backend: Backend | None) -> Path:
    """Where the distilled student of this exact configuration is checkpointed."""
    root = Path(os.environ.get("FSCOMPILE_CACHE", Path.home() / ".cache" / "fscompile"))
    return root / "checkpoints" / f"{cfg.fingerprint()}-{backend.name if backend else 'agnostic'}"


INFO_KEYS = ("prepare", "layer_selection", "embeddings", "teacher_layers")


def save_checkpoint(ckpt: Path, student: Any, stats: DistillStats) -> None:
    """Distilled student + stats, written beside and renamed into place (never half-written)."""
    tmp = ckpt.with_name(ckpt.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_torch(tmp / "student")
    info = {k: student.info.get(k) for k in INFO_KEYS}
    write_json(tmp / "info.json", info)
    write_json(tmp / "stats.json", dataclasses.asdict(stats))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def load_checkpoint(ckpt: Path) -> tuple[Any, DistillStats]:
    student = load_any(ckpt / "student")
    student.info.update(json.loads((ckpt / "info.json").read_text()))
    stats = DistillStats(**json.loads((ckpt / "stats.json").read_text()))
    stats.resumed_from = str(ckpt)
    return student, stats


def resume_or_distill(ckpt: Path, student: Any, progress: Any, train: Any) -> tuple[Any, DistillStats]:
    """The student checkpointed at ``ckpt`` by an interrupted run of this configuration, or
    ``student`` after ``train()`` (which distils it in place and returns the stats), checkpointed."""
    if (ckpt / "stats.json").is_file():
        student, stats = load_checkpoint(ckpt)
        progress("distill", 1, 1, f"resumed from checkpoint {ckpt}")
        return student, stats
    stats = train()
    save_checkpoint(ckpt, student, stats)
    return student, stats
