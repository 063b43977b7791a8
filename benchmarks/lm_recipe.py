"""Next-token KD recipe trials on a pretrained LLM (issue 19): which learning rate, temperature, hidden
matching and MLP pruning heal a student that lost half of SmolLM2's blocks, from 10 passages.

    python benchmarks/lm_recipe.py --steps 40 --out bench-out/lm-recipe

Same student (fscompile's default block choice on draw 0), same transfer set (the shot windows and 128
teacher samples), 40 steps of 8 windows each; perplexity on 60 held-out windows of other Wikipedia
articles (the passages benchmarks/lm.py writes). Prints one line per recipe; rows in results.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, Results

RECIPES = {  # name: (DistillConfig overrides, MLP pruning rate)
    "lr 5e-5, T 2, no hidden": ({"lr": 5e-5, "temperature": 2.0, "hidden_weight": 0.0}, 0.0),
    "lr 3e-4, T 2": ({"lr": 3e-4, "temperature": 2.0}, 0.0),
    "lr 3e-4, T 1, no hidden": ({"lr": 3e-4, "temperature": 1.0, "hidden_weight": 0.0}, 0.0),
    "lr 3e-4, T 1": ({"lr": 3e-4, "temperature": 1.0}, 0.0),
    "lr 3e-4, T 1, 20% MLP pruned": ({"lr": 3e-4, "temperature": 1.0}, 0.2),
    "lr 1e-3, T 1": ({"lr": 1e-3, "temperature": 1.0}, 0.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--squad", default=str(SHARED / "data/squad_v1.1/dev-v1.1.json"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=str(REPO / "bench-out/lm-recipe"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from lm import write_passages

    from fscompile.config import DistillConfig
    from fscompile.data.lm import load_lm_task
    from fscompile.models.lm import derive_lm_student, load_lm_teacher
    from fscompile.tasks.lm import (
        TokenTransfer,
        distill_lm,
        drop_block,
        lm_metrics,
        teacher_samples,
        token_scores,
        torch_lm_runner,
        windows,
    )

    out = Path(args.out)
    results = Results(out)
    teacher = load_lm_teacher(args.teacher)
    task = load_lm_task(str(write_passages(Path(args.squad), out / "passages")), 10, 0, 40)
    shots = windows(teacher, [e.text for e in task.shots], 128)
    ev = windows(teacher, [e.text for e in task.eval], 128)[:60]
    ref = token_scores(torch_lm_runner(teacher), teacher, ev)

    def score(model) -> dict:
        return lm_metrics(token_scores(torch_lm_runner(model), model, ev), ev, ref)

    results.record({"recipe": "teacher", **score(teacher)})
    samples = teacher_samples(teacher, shots, 128, 0, 128)
    transfer = TokenTransfer(shots + samples, ["shot"] * len(shots) + ["teacher-sample"] * len(samples))
    keep, _ = drop_block(teacher, shots, len(teacher.layers()) // 2)
    init = derive_lm_student(teacher, keep)
    results.record({"recipe": "untrained", "layers_kept": keep, **score(init)})
    for name, (overrides, prune) in RECIPES.items():
        student = copy.deepcopy(init)
        if prune:
            student.prune(prune)
        t = time.perf_counter()
        stats = distill_lm(teacher, student, transfer, keep,
                           DistillConfig(steps=args.steps, batch_size=8, evals=0, **overrides), 0)
        results.record({"recipe": name, "steps": args.steps, "seconds": time.perf_counter() - t,
                        "losses": stats.losses, **score(student)})


if __name__ == "__main__":
    main()
