"""Calibration sets built from the shots and their augmented variants."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..data.batching import length_sorted_batches, pad_batch


@dataclass
class CalibrationSet:
    """Batches of model inputs (token ids, or pixels) for calibrating and for choosing variants.

    ``calibrate`` feeds the quantizer; ``validate`` is held out from it and is what the
    backend compares variants on, against the fp32 model's own outputs.
    """

    calibrate: list[dict[str, np.ndarray]]
    validate: list[dict[str, np.ndarray]]

    @property
    def num_calibration_samples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.calibrate)

    @property
    def num_validation_samples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.validate)


def batches_from_encodings(enc: dict[str, list[list[int]]], names: list[str], pad_id: int,
                           batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Pad pre-tokenised rows into batches of one common width: histogram calibrators
    (entropy, percentile) stack activations across batches and need equal shapes."""
    width = max(len(x) for x in enc["input_ids"])
    return [pad_batch(enc, idx, names, pad_id, width) for idx in length_sorted_batches(enc, batch_size)]


class ReaderFromBatches(CalibrationDataReader):
    """An ONNX Runtime calibration data reader over a list of input batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


__all__ = ["CalibrationSet", "batches_from_encodings", "ReaderFromBatches"]
