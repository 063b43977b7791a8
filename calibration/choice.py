"""The ``auto`` choice: which calibration methods to try, and which INT8 variant to keep."""
from __future__ import annotations

import math

import numpy as np

# Variants within this agreement of the best (or within two standard errors, whichever is
# larger: a few hundred validation inputs cannot tell 99.2% from 100%) are "as accurate";
# size, then latency, decides between them.
AGREEMENT_TIE = 0.005
# Where the teacher's probabilities on the held-out inputs are known (text classification), a variant is
# "as accurate" when its estimated retention is within this of the fp32 student's (or two standard errors of
# the paired difference): agreement alone counts a flip where the teacher hesitated like one where it was sure.
# On an AMX Xeon, SST-2's default compile shipped static QDQ at 54.7 MB and 6.9 ms over dynamic INT8 at 16.0 MB
# and 4.7 ms for 1.6 points of agreement (0.996 against 0.980 on 256 generated texts), and then scored exactly
# the student's accuracy (benchmarks/results/README.md).
RETENTION_TIE = 0.005
# Sizes within this share of the smallest count as equal, so latency decides.
SIZE_TIE = 0.1

SELECTION = (f"the smallest (within {SIZE_TIE:.0%}), then fastest at batch 1, of the variants whose retention, "
             f"estimated from the teacher's probabilities on held-out inputs (generated or unlabelled text where "
             f"there is some, else augmented shots), is within {RETENTION_TIE:.1%} or two standard errors of the fp32 "
             f"student's (of the best variant's if none is; without the teacher's probabilities: agreement with the "
             f"fp32 model within {AGREEMENT_TIE:.1%} or two standard errors of the best); under a budget, of the "
             f"variants within its size and latency limits (or nearest to them)")


def retention_change(probabilities: np.ndarray, pred: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """A variant's estimated retention less the fp32 model's, and its standard error, on the same rows: the
    mean probability the teacher gives the variant's answers less the mean it gives the fp32 model's, over
    the mean of its top probability (as ``fscompile.evaluate.retention_estimate`` reads it). Paired rows:
    only where the two disagree does it move."""
    rows = np.arange(len(pred))
    diff = probabilities[rows, pred] - probabilities[rows, reference]
    scale = float(probabilities.max(-1).mean()) or 1.0
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()) / scale, se / scale


def methods(requested: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """The static calibration methods to build: all the target knows for ``auto``, else the one asked."""
    return known if requested == "auto" else (requested,)


def choose(table: dict[str, dict[str, float]], n_validation: int,
           limits: tuple[float | None, float | None] = (None, None)) -> str:
    """The variant to ship from ``{name: {"agreement", "b1_p50_ms", "size_mb"}}``: of those as accurate
    as the fp32 model, the smallest, and the fastest among sizes within :data:`SIZE_TIE` of it. As accurate:
    with ``retention_change`` and ``retention_change_se`` in every entry (:func:`retention_change`), within
    :data:`RETENTION_TIE` of the fp32 model (those nearest to it if none is); else agreement with it tied with
    the best's (:data:`AGREEMENT_TIE`). An edge device pays for size in storage and memory on every copy; a
    few tenths of a point of agreement on synthetic inputs are noise (a 6-class task shipped static QDQ at
    54.7 MB and 10.8 ms over dynamic at 16.0 MB and 6.2 ms for 0.8 points).
    ``limits`` (size MB, batch-1 ms; a budget search's): only the variants within them compete, or if
    none is, those nearest to them (within 10% of the least excess)."""
    if any(v is not None for v in limits):
        size_max, ms_max = (math.inf if v is None else v for v in limits)
        excess = {k: max(t.get("size_mb", 0.0) / size_max, t["b1_p50_ms"] / ms_max) for k, t in table.items()}
        least = min(excess.values())
        table = {k: t for k, t in table.items() if excess[k] <= max(1.0, least * 1.1)}
    if all("retention_change" in t for t in table.values()):
        margin = {k: max(RETENTION_TIE, 2 * t.get("retention_change_se", 0.0)) for k, t in table.items()}
        tied = [k for k, t in table.items() if t["retention_change"] >= -margin[k]]
        if not tied:  # every variant loses more than that: those as good as the best one
            best = max(t["retention_change"] for t in table.values())
            tied = [k for k, t in table.items() if t["retention_change"] >= best - margin[k]]
    else:
        best = max(t["agreement"] for t in table.values())
        n = max(1, n_validation)
        margin_a = max(AGREEMENT_TIE, 2 * math.sqrt(max(best * (1 - best), 1 / n) / n))
        tied = [name for name, t in table.items() if t["agreement"] >= best - margin_a]
    smallest = min(table[name].get("size_mb", 0.0) for name in tied)
    small = [name for name in tied if table[name].get("size_mb", 0.0) <= smallest * (1 + SIZE_TIE)]
    return min(small, key=lambda name: table[name]["b1_p50_ms"])
