"""Calibration for every task: sets built from the shots and their variants (:mod:`.sets`), and
the ``auto`` choice of method and INT8 variant (:mod:`.choice`)."""
from __future__ import annotations

from .choice import AGREEMENT_TIE, RETENTION_TIE, SELECTION, choose, methods, retention_change
from .sets import (
    BATCH,
    Batches,
    CalibrationSet,
    ReaderFromBatches,
    batches_from_encodings,
    from_transfer,
    from_views,
    split,
)

__all__ = ["AGREEMENT_TIE", "BATCH", "RETENTION_TIE", "SELECTION", "Batches", "CalibrationSet", "ReaderFromBatches", "batches_from_encodings",
           "choose", "from_transfer", "from_views", "methods", "retention_change", "split"]
