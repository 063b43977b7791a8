"""Dynamic padding shared by training, evaluation and calibration."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_batch(enc: dict[str, list[list[int]]], idx: Sequence[int], names: list[str], pad_id: int,
              width: int | None = None) -> dict[str, np.ndarray]:
    """Rows ``idx`` of a tokenizer's un-padded output, right-padded to their longest member
    (or to ``width``)."""
    width = width or max(len(enc["input_ids"][i]) for i in idx)
    return {k: np.array([enc[k][i] + [pad_id if k == "input_ids" else 0] * (width - len(enc[k][i]))
                         for i in idx], dtype=np.int64) for k in names}


def length_sorted_batches(enc: dict[str, list[list[int]]], batch_size: int) -> list[list[int]]:
    """Index batches in order of length, so each batch pads little."""
    order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable").tolist()
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
