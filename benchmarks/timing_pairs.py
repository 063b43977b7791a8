"""How steady is the ratio of two artifacts' latencies timed in turns? (issue 20: a trained build is
checked in its shape's frame, ``fscompile.search._as_probed``.) Times ``A`` against ``B`` ``--times``
times, interleaved so the statistics see the same minutes: the ratio of the two medians over 5 rounds
(``profile.in_turns``, as the search checks a build), of the two minima over the same rounds (noise on a shared
host only adds time), and the median of the per-round ratios over 10 rounds (paired, so drift between rounds
would cancel). Two artifacts of the same shape should measure 1.0x.

    python benchmarks/timing_pairs.py bench-out/budget9/runs/sst2/default bench-out/budget9/runs/qnli/default
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="a compile's output directory")
    p.add_argument("b", type=Path)
    p.add_argument("--times", type=int, default=25)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()

    from fscompile.backends.onnxruntime import OrtRunner
    from fscompile.profile import per_turn, synthetic_inputs

    runs = [OrtRunner(d / "model" / "model.onnx") for d in (args.a, args.b)]
    feeds = [synthetic_inputs(r.names, 1, args.seq_len, 30000) for r in runs]
    fa, fb = (lambda: runs[0](feeds[0])), (lambda: runs[1](feeds[1]))
    medians, minima, paired = [], [], []
    for _ in range(args.times):
        per_a, per_b = per_turn([fa, fb], rounds=5, budget_s=1.0)
        medians.append(float(np.median(per_a) / np.median(per_b)))
        minima.append(float(per_a.min() / per_b.min()))
        per_a, per_b = per_turn([fa, fb], rounds=10, budget_s=1.0)
        paired.append(float(np.median(per_a / per_b)))
    for name, r in (("ratio of medians (5 rounds, 1 s each)", medians), ("ratio of minima (the same rounds)", minima),
                    ("paired (10 rounds, 1 s each)", paired)):
        r = np.array(r)
        print(f"{name}: median {np.median(r):.3f}, range {r.min():.3f}-{r.max():.3f}, sd {r.std():.3f}; "
              f"more than 5% off the median: {(np.abs(r / np.median(r) - 1) > 0.05).sum()} of {len(r)}")


if __name__ == "__main__":
    main()
