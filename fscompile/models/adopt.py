"""Teachers handed over as Python objects (``fscompile.compile(teacher=model, ...)``), as users of
torchao, ModelOpt and NNCF do: a transformers model with its tokenizer, a transformers image
model with its image processor, or any ``torch.nn.Module`` image classifier."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError
from .base import module_sha256


def adopt_teacher(teacher: Any, tokenizer: Any = None, processor: Any = None) -> tuple[str, dict[str, Any]]:
    """(the teacher spec the pipeline loads, options the object implies). A transformers model
    with a tokenizer is saved once under ``FSCOMPILE_CACHE/teachers/`` (keyed by its weights) and
    loaded from there like any local model; an image classifier stays in memory."""
    if not isinstance(teacher, nn.Module):
        raise InputError(f"teacher must be a name, a path or a torch.nn.Module, got {type(teacher).__name__}")
    from .vision import register_module

    is_hf = hasattr(teacher, "save_pretrained") and hasattr(teacher, "config")
    if is_hf and processor is None:
        if tokenizer is None:
            raise InputError("a transformers teacher needs its tokenizer (tokenizer=...) or, for images, "
                             "its image processor (processor=...)")
        return str(_saved(teacher, tokenizer)), {}
    options: dict[str, Any] = {}
    if processor is not None:
        options = _processor_options(processor)
    return register_module(teacher), options


def _saved(model: nn.Module, tokenizer: Any) -> Path:
    """``model`` and ``tokenizer`` in a cache directory named by the weights (written beside, then
    renamed: never half-written)."""
    root = Path(os.environ.get("FSCOMPILE_CACHE", Path.home() / ".cache" / "fscompile")) / "teachers"
    path = root / f"{type(model).__name__}-{module_sha256(model)[:16]}"
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def _processor_options(processor: Any) -> dict[str, Any]:
    """Input side, mean and std from a Hugging Face image processor."""
    size = getattr(processor, "size", None)
    if isinstance(size, int) or size is None:
        side = size
    else:  # a dict, or transformers 5's SizeDict
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        side = get("height") or get("shortest_edge")
    out: dict[str, Any] = {}
    if side:
        out["image_size"] = int(side)
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        v = getattr(processor, key, None)
        if v is not None:
            out[name] = tuple(float(x) for x in (v if len(v) == 3 else list(v) * 3)[:3])
    return out
