"""How well the label-free retention estimate tracks measured retention (issue 20).

Reads recipe-memory files (``recipes.jsonl``: every compile, bench draw and search trial writes a
row) and benchmark result files, keeps the rows that carry both the measured retention (artifact
accuracy / teacher accuracy, from labels) and ``retention_estimate`` (from the teacher's
probabilities, no labels; ``fscompile.evaluate.retention_estimate``), and reports how often the
estimate lands within 1.5 points, beside plain agreement with the teacher as the naive estimate, and
what each temperature ``fscompile.evaluate.RETENTION_TEMPERATURE`` could take would give.

    python benchmarks/retention.py bench-out/budget/*.jsonl ~/.cache/fscompile/recipes.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def rows(paths: list[Path]) -> list[dict]:
    out, seen = [], set()
    for p in paths:
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("retention") is None or r.get("retention_estimate") is None:
                continue
            key = (r.get("fingerprint"), r.get("latency_ms"), r.get("retention"))  # one build, once
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--tolerance", type=float, default=0.015)
    args = p.parse_args()
    data = rows(args.files)
    if not data:
        raise SystemExit("no rows with both a measured retention and an estimate")
    y = np.array([r["retention"] for r in data])
    est = np.array([r["retention_estimate"] for r in data])
    agree = np.array([r.get("agreement", np.nan) for r in data])
    err = est - y
    print(f"{len(data)} builds; measured retention {y.min():.3f}-{y.max():.3f}")
    print(f"estimate within {args.tolerance:.1%}: {(np.abs(err) <= args.tolerance).mean():.0%} of builds; "
          f"mean |error| {np.abs(err).mean():.4f}, mean error {err.mean():+.4f}, worst {err[np.abs(err).argmax()]:+.4f}")
    print(f"agreement as the estimate, within {args.tolerance:.1%}: {(np.abs(agree - y) <= args.tolerance).mean():.0%}")
    sd = np.array([r.get("retention_estimate_sd") or np.nan for r in data])
    if np.isfinite(sd).any():  # how far chance alone moves measured retention on these rows
        have = np.isfinite(sd)
        print(f"sampling spread of measured retention (labels drawn from the estimate's own probabilities): "
              f"{np.nanmin(sd):.4f}-{np.nanmax(sd):.4f}; within 2 of it: {(np.abs(err[have]) <= 2 * sd[have]).mean():.0%} "
              f"of {have.sum()} builds")
    temps = sorted({t for r in data for t in (r.get("retention_estimates") or {})}, key=float)
    for t in temps:  # what RETENTION_TEMPERATURE would give (rows that recorded every temperature)
        have = [r for r in data if t in (r.get("retention_estimates") or {})]
        e = np.array([r["retention_estimates"][t] - r["retention"] for r in have])
        print(f"  at temperature {t}: within {args.tolerance:.1%} on {(np.abs(e) <= args.tolerance).mean():.0%} of "
              f"{len(have)} builds, mean |error| {np.abs(e).mean():.4f}, mean error {e.mean():+.4f}")
    for r, e in zip(data, err):
        print(f"  {r.get('task')}: {r.get('recipe', {}).get('layers', r.get('layers'))} layers, retention "
              f"{r['retention']:.4f}, estimate {r['retention_estimate']:.4f} ({e:+.4f})")


if __name__ == "__main__":
    main()
