"""Models of each task behind one interface (``export_onnx``, ``save_pretrained``, ``save_torch``,
``prune``, ``input_names``, ``fusion``, ``quant_ops``); :func:`load_any` reads back a ``save_torch`` copy."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_any(path: Path) -> Any:
    """A model written by ``save_torch`` of any task (safetensors, no pickle)."""
    import json

    from .vision import VISION_FILE, load_image_model

    if (Path(path) / VISION_FILE).is_file():
        return load_image_model(Path(path))
    from .base import HEAD_FILE
    from .text import load_torch

    kind = json.loads((Path(path) / HEAD_FILE).read_text()).get("kind")
    if kind == "causal-lm":
        from .lm import load_lm_torch

        return load_lm_torch(Path(path))
    if kind == "qa":
        from .qa import QAModel

        return load_torch(Path(path), QAModel)
    return load_torch(Path(path))
