"""The ``auto`` choice: which calibration methods to try, and which INT8 variant to keep."""
from __future__ import annotations

import math

# Variants within this agreement of the best (or within two standard errors, whichever is
# larger: a few hundred validation inputs cannot tell 99.2% from 100%) are "as accurate";
# size, then latency, decides between them.
AGREEMENT_TIE = 0.005
# Sizes within this share of the smallest count as equal, so latency decides.
SIZE_TIE = 0.1

SELECTION = (f"the smallest (within {SIZE_TIE:.0%}), then fastest at batch 1, of the variants whose agreement "
             f"with the fp32 model on held-out inputs (generated or unlabelled text where there is some, else "
             f"augmented shots) is within {AGREEMENT_TIE:.1%} or two standard errors of the best; under a budget, "
             f"of the variants within its size and latency limits (or nearest to them)")


def methods(requested: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """The static calibration methods to build: all the target knows for ``auto``, else the one asked."""
    return known if requested == "auto" else (requested,)


def choose(table: dict[str, dict[str, float]], n_validation: int,
           limits: tuple[float | None, float | None] = (None, None)) -> str:
    """The variant to ship from ``{name: {"agreement", "b1_p50_ms", "size_mb"}}``: of those whose
    agreement with the fp32 model ties with the best (:data:`AGREEMENT_TIE`), the smallest, and the
    fastest among sizes within :data:`SIZE_TIE` of it. An edge device pays for size in storage and
    memory on every copy; a few tenths of a point of agreement on synthetic inputs are noise (a 6-class
    task shipped static QDQ at 54.7 MB and 10.8 ms over dynamic at 16.0 MB and 6.2 ms for 0.8 points).
    ``limits`` (size MB, batch-1 ms; a budget search's): only the variants within them compete, or if
    none is, those nearest to them (within 10% of the least excess)."""
    if any(v is not None for v in limits):
        size_max, ms_max = (math.inf if v is None else v for v in limits)
        excess = {k: max(t.get("size_mb", 0.0) / size_max, t["b1_p50_ms"] / ms_max) for k, t in table.items()}
        least = min(excess.values())
        table = {k: t for k, t in table.items() if excess[k] <= max(1.0, least * 1.1)}
    best = max(t["agreement"] for t in table.values())
    n = max(1, n_validation)
    margin = max(AGREEMENT_TIE, 2 * math.sqrt(max(best * (1 - best), 1 / n) / n))
    tied = [name for name, t in table.items() if t["agreement"] >= best - margin]
    smallest = min(table[name].get("size_mb", 0.0) for name in tied)
    small = [name for name in tied if table[name].get("size_mb", 0.0) <= smallest * (1 + SIZE_TIE)]
    return min(small, key=lambda name: table[name]["b1_p50_ms"])
