"""Where the label-free retention estimate's error comes from: the teacher's dropout, its temperature (issue 20).

Re-scores the artifacts budget runs kept (``OUT/runs/TASK/*``, one per distinct student distilled from the
task's teacher, over every ``--out``) on the task's evaluation rows, and reports each build's estimate error
with: the teacher's probabilities as a compile reads them now (one pass with its dropout on,
``fscompile.evaluate.dropout_probabilities``); its plain softmax at the temperature used before
(``RETENTION_TEMPERATURE`` for a teacher with its own head, the held-out fit for a head fitted on the shots);
at the temperature that calibrates the teacher on the evaluation *labels* (the best any temperature could do,
not available to a compile); and, for a teacher with its own head, at temperatures fitted on the labelled
shots of ``--draws`` other shot draws (what a compile could derive from its own inputs).

    python benchmarks/retention_temperature.py --out bench-out/budget* --tasks sst2,agnews,qnli
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from budget import TASKS
from common import REPO


def teacher_logits(teacher, examples) -> np.ndarray:
    from fscompile.evaluate import predict, torch_runner

    return predict(torch_runner(teacher), teacher.tokenizer, teacher.input_names, examples, 128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", nargs="+", default=[str(REPO / "bench-out/budget9")],
                   help="benchmarks/budget.py output directories")
    p.add_argument("--tasks", default="sst2,agnews,qnli")
    p.add_argument("--max-eval", type=int, default=2500, help="as the budget run evaluated")
    p.add_argument("--draws", type=int, default=30, help="other shot draws to fit a temperature on (seeds 1..N)")
    p.add_argument("--tolerance", type=float, default=0.015)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from fscompile.backends.onnxruntime import OrtRunner
    from fscompile.config import CompileConfig
    from fscompile.evaluate import (RETENTION_TEMPERATURE, dropout_probabilities, fit_temperature, predict,
                                    retention_estimate, softened)
    from fscompile.models.text import load_teacher
    from fscompile.tasks.text import adapt, load_data, to_teacher_labels

    for t in args.tasks.split(","):
        spec, data = TASKS[t]
        cfg = CompileConfig(teacher=spec, data=data, shots=10, max_eval=args.max_eval)
        task = load_data(cfg)
        teacher = load_teacher(spec, task.label_names)
        task = to_teacher_labels(task, teacher)
        headed = teacher.has_head
        adaptation = adapt(teacher, task, cfg)
        used = RETENTION_TEMPERATURE if headed else adaptation["temperature"]
        logits, y = teacher_logits(teacher, task.eval), np.array([e.label for e in task.eval])
        dropped = dropout_probabilities(teacher, task.eval, logits, 128, None if headed else used)
        oracle = fit_temperature(logits, y)
        drawn = []
        if headed:  # a headless teacher's head is refitted per draw (minutes each): not drawn
            for seed in range(1, args.draws + 1):
                other = to_teacher_labels(load_data(CompileConfig(teacher=spec, data=data, shots=10,
                                                                  max_eval=args.max_eval, seed=seed)), teacher)
                drawn.append(fit_temperature(teacher_logits(teacher, other.shots), np.array([e.label for e in other.shots])))
        teacher_acc = float((logits.argmax(-1) == y).mean())
        print(f"{t}: {len(y)} rows, teacher accuracy {teacher_acc:.4f}; temperature used {used:.2f}, calibrating the "
              f"teacher on the labels {oracle:.2f}"
              + (f", fitted on the shots of {len(drawn)} draws: median {np.median(drawn):.2f} (10-90% "
                 f"{np.percentile(drawn, 10):.2f}-{np.percentile(drawn, 90):.2f})" if drawn else ""))
        seen, errors = set(), {"dropout": [], "used": [], "calibrated": []}
        top = logits.argmax(-1)
        for man in sorted(m for out in args.out for m in (Path(out) / "runs" / t).glob("*/manifest.json")):
            m = json.loads(man.read_text())
            sha = m["student"]["weights_sha256"]
            if sha in seen or Path(m["teacher"]["source"]).resolve() != Path(teacher.source).resolve():  # an earlier run's other teacher
                continue
            seen.add(sha)
            model = man.parent / m["artifact"]["dir"]
            run = OrtRunner(model / m["artifact"]["model_file"])
            pred = predict(run, AutoTokenizer.from_pretrained(str(model)), run.names, task.eval, 128).argmax(-1)
            real = float((pred == y).mean()) / teacher_acc
            err = {"dropout": retention_estimate(dropped, pred, top) - real,
                   "used": retention_estimate(softened(logits, used), pred, top) - real,
                   "calibrated": retention_estimate(softened(logits, oracle), pred, top) - real}
            for k, v in err.items():
                errors[k].append(v)
            line = (f"  {man.parent.parent.parent.parent.name}/{man.parent.name}: {len(m['student']['layers_kept'])} "
                    f"layers, real retention {real:.4f}, agreement {(pred == top).mean():.3f}; estimate error "
                    f"{err['dropout']:+.4f} with dropout, {err['used']:+.4f} at T={used:.2f}, "
                    f"{err['calibrated']:+.4f} calibrated on the labels")
            if drawn:
                e = np.array([retention_estimate(softened(logits, T), pred, top) - real for T in drawn])
                line += f", within {args.tolerance:.1%} on {(np.abs(e) <= args.tolerance).mean():.0%} of shot-fitted"
            print(line, flush=True)
        print("  within {:.1%}: ".format(args.tolerance) + ", ".join(
            f"{k} {np.mean(np.abs(v) <= args.tolerance):.0%} (worst {np.abs(v).max():.3f})"
            for k, v in errors.items() if v), flush=True)


if __name__ == "__main__":
    main()
