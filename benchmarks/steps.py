"""Does training longer, or on a larger transfer set, buy retention? The same recipe at 1x and 2x the
derived step count, and with 50, 100 (the default) or 200 augmented variants per shot (issue 20).

    python benchmarks/steps.py --out bench-out/steps                                 # steps
    python benchmarks/steps.py --scales 1 --augments 50,200 --out bench-out/transfer   # transfer-set size

One fixed recipe per task of ``benchmarks/budget.py`` (its teachers and data; QNLI's from
``benchmarks/finetune_teacher.py --task qnli``), compiled at each ``--scales`` x ``--augments``, real and
estimated retention side by side. The answer decides whether each is a default or a search dimension.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from budget import TASKS
from common import REPO, Results

RECIPES = {"qnli": ("1,3,5", 0.0), "agnews": ("2,5", 0.0), "sst2": ("1,3,5", 0.2)}  # layers, prune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="qnli,agnews,sst2")
    p.add_argument("--scales", default="1,2")
    p.add_argument("--augments", default="100", help="augmented variants per shot (the transfer set's size)")
    p.add_argument("--out", default=str(REPO / "bench-out/steps"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import fscompile

    results = Results(Path(args.out))
    for task in args.tasks.split(","):
        (teacher, data), (layers, prune) = TASKS[task], RECIPES[task]
        for scale, augment in ((s, a) for s in map(float, args.scales.split(",")) for a in map(int, args.augments.split(","))):
            start = time.perf_counter()
            m = fscompile.compile(teacher, data=data, shots=10, max_eval=1000, student_layers=layers, prune=prune,
                                  steps_scale=scale, augment=augment, force=True,
                                  out=Path(args.out) / f"{task}-{scale:g}x-{augment}")
            art, t = m["metrics"]["artifact"], m["metrics"]["teacher"]
            results.record({"task": task, "layers": layers, "prune": prune, "steps_scale": scale, "augment": augment,
                            "transfer": m["distillation"]["transfer_size"],
                            "steps": m["distillation"]["steps"], "best_step": m["distillation"].get("best_step"),
                            "retention": art["accuracy"] / t["accuracy"], "retention_estimate": art["retention_estimate"],
                            "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
