"""The ``auto`` choice: which calibration methods to try, and which INT8 variant to keep."""
from __future__ import annotations

import math

# Variants within this agreement of the best (or within two standard errors, whichever is
# larger: a few hundred validation inputs cannot tell 99.2% from 100%) are "as accurate";
# latency decides between them.
AGREEMENT_TIE = 0.005

SELECTION = ("highest agreement with the fp32 model on held-out augmented shots (ties: "
             f"within {AGREEMENT_TIE:.1%} or two standard errors), then lowest batch-1 latency")


def methods(requested: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """The static calibration methods to build: all the target knows for ``auto``, else the one asked."""
    return known if requested == "auto" else (requested,)


def choose(table: dict[str, dict[str, float]], n_validation: int) -> str:
    """The variant to ship from ``{name: {"agreement", "b1_p50_ms", ...}}``: the fastest of those
    whose agreement with the fp32 model ties with the best (see :data:`AGREEMENT_TIE`)."""
    best = max(t["agreement"] for t in table.values())
    n = max(1, n_validation)
    margin = max(AGREEMENT_TIE, 2 * math.sqrt(max(best * (1 - best), 1 / n) / n))
    tied = [name for name, t in table.items() if t["agreement"] >= best - margin]
    return min(tied, key=lambda name: table[name]["b1_p50_ms"])
