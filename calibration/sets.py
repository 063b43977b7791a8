"""Calibration sets for every task, built from the shots and their variants: one part feeds the
quantizer, a disjoint part is what the backend compares its INT8 variants on."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..data.batching import length_sorted_batches, pad_batch

Batches = list[dict[str, np.ndarray]]


@dataclass
class CalibrationSet:
    """Batches of model inputs (token ids, or pixels) for calibrating and for choosing variants.

    ``calibrate`` feeds the quantizer; ``validate`` is held out from it and is what the
    backend compares variants on, against the fp32 model's own outputs. ``read_teacher`` (text
    classification) gives the teacher's class probabilities on each ``validate`` batch, row for row, so
    that a variant is judged by the retention it is estimated to lose, not by bare agreement; it is read
    only when a backend asks (:attr:`validate_probabilities`), so a target without a choice pays nothing.
    """

    calibrate: Batches
    validate: Batches
    read_teacher: Callable[[], list[np.ndarray]] | None = field(default=None, repr=False)

    @cached_property
    def validate_probabilities(self) -> list[np.ndarray] | None:
        return self.read_teacher() if self.read_teacher is not None else None

    @property
    def num_calibration_samples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.calibrate)

    @property
    def num_validation_samples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.validate)


def split(n: int, seed: int, *, shots: int = 0, n_calibrate: int = 256,
          n_validate: int = 256) -> tuple[list[int], list[int]]:
    """(calibrate, validate) indices into a transfer set of ``n`` items whose first ``shots`` are
    the labelled shots: the shots always calibrate, then a seeded share of the variants, never more
    than half of them so that others are left to validate on (all of them validate only when none are)."""
    rest = np.random.default_rng(seed + 1).permutation(np.arange(shots, n)).tolist()
    take = max(0, min(n_calibrate - shots, len(rest) // 2))
    if shots + take == 0:  # a single item: it both calibrates and validates
        take = min(1, len(rest))
    cal = list(range(shots)) + rest[:take]
    return cal, rest[take:take + n_validate] or cal


def from_transfer(n: int, encode: Callable[[list[int]], Batches], seed: int, *, shots: int = 0,
                  n_calibrate: int = 256, n_validate: int = 256) -> CalibrationSet:
    """A calibration set over a task's transfer set; ``encode(indices)`` makes the model's input batches."""
    cal, val = split(n, seed, shots=shots, n_calibrate=n_calibrate, n_validate=n_validate)
    return CalibrationSet(calibrate=encode(cal), validate=encode(val))


def from_views(views: Callable[[int, int], np.ndarray], seed: int, *, n_calibrate: int = 256,
               n_validate: int = 256, batch: int = 16, name: str = "pixel_values") -> CalibrationSet:
    """A calibration set of augmented views (``views(count, seed)``: the shots first, then random
    views), with the validation views drawn from another seed."""
    def batches(x: np.ndarray) -> Batches:
        return [{name: np.ascontiguousarray(x[i:i + batch])} for i in range(0, len(x), batch)]

    return CalibrationSet(calibrate=batches(views(n_calibrate, seed + 1)),
                          validate=batches(views(n_validate, seed + 7919)))


BATCH = 8  # rows per calibration and validation batch


def batches_from_encodings(enc: dict[str, list[list[int]]], names: list[str], pad_id: int,
                           batch_size: int = BATCH) -> Batches:
    """Pad pre-tokenised rows into batches of one common width: histogram calibrators
    (entropy, percentile) stack activations across batches and need equal shapes."""
    width = max(len(x) for x in enc["input_ids"])
    return [pad_batch(enc, idx, names, pad_id, width) for idx in length_sorted_batches(enc, batch_size)]


class ReaderFromBatches(CalibrationDataReader):
    """An ONNX Runtime calibration data reader over a list of input batches."""

    def __init__(self, batches: Batches) -> None:
        self._batches = batches
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)
