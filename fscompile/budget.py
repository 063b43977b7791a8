"""Budgets a compile must meet: latency, size, peak memory, and retention estimated without
labels (``fscompile.evaluate.retention_estimate``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    """Limits the shipped artifact must meet; None = no limit. Latency is batch 1 at ``--seq-len``
    on this machine, size the artifact's files, peak the resident memory of a process serving it."""

    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_peak_mb: float | None = None
    min_retention: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_latency_ms", "max_size_mb", "max_peak_mb"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        if self.min_retention is not None and not 0 < self.min_retention <= 1:
            raise ValueError(f"--min-retention must be in (0, 1], got {self.min_retention}")

    @classmethod
    def pop_from(cls, options: dict[str, Any]) -> Budget:
        """The budget among ``options`` (CLI or API keywords), taken out of them."""
        return cls(**{f.name: options.pop(f.name) for f in dataclasses.fields(cls) if f.name in options})

    def __bool__(self) -> bool:
        return any(v is not None for v in self.limits().values())

    def limits(self) -> dict[str, float | None]:
        """The limits under the keys :func:`figures` measures (None: no limit)."""
        return {"latency_ms": self.max_latency_ms, "size_mb": self.max_size_mb, "peak_mb": self.max_peak_mb,
                "retention": self.min_retention}

    def violations(self, figures: dict[str, Any]) -> list[str]:
        """What ``figures`` (keys as :meth:`limits`; a missing figure is not checked) fail, as
        ``"latency 3.1 ms > 2 ms"``."""
        out = []
        for key, limit in self.limits().items():
            v = figures.get(key)
            if limit is None or v is None:
                continue
            if key == "retention" and v < limit:
                out.append(f"retention {v:.3f} < {limit:g}")
            elif key != "retention" and v > limit:
                unit = {"ms": "ms", "mb": "MB"}[key.split("_")[1]]
                out.append(f"{key.split('_')[0]} {v:.3g} {unit} > {limit:g} {unit}")
        return out

    def describe(self) -> str:
        """The limits in words, for messages: "latency ≤ 2 ms, estimated retention ≥ 0.97"."""
        names = {"latency_ms": "latency ≤ {} ms", "size_mb": "size ≤ {} MB", "peak_mb": "peak memory ≤ {} MB",
                 "retention": "estimated retention ≥ {}"}
        return ", ".join(names[k].format(f"{v:g}") for k, v in self.limits().items() if v is not None)


def figures(manifest: dict[str, Any]) -> dict[str, float | None]:
    """What a built artifact measured, in :meth:`Budget.limits`' keys: batch-1 p50 latency, size,
    peak memory of its serving process, and retention estimated without labels."""
    prof = manifest["profile"]["artifact"]
    return {"latency_ms": prof["batch1"]["p50_ms"], "size_mb": manifest["size_mb"]["artifact"],
            "peak_mb": prof.get("peak_rss_mb"), "retention": manifest["metrics"]["artifact"].get("retention_estimate")}
