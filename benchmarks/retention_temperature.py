"""Is the label-free retention estimate's error a matter of the teacher's temperature? (issue 20)

Re-scores the artifacts a budget run kept (``OUT/runs/TASK/*``, one per distinct student) on the task's
evaluation rows, and reports each build's estimate error at: the temperature the compile used
(``RETENTION_TEMPERATURE`` for a teacher with its own head, the held-out fit for a head fitted on the
shots), the temperature that calibrates the teacher on the evaluation *labels* (the best any temperature
could do, not available to a compile), and, for a teacher with its own head, temperatures fitted on
the labelled shots of ``--draws`` other shot draws (what a compile could derive from its own inputs).

    python benchmarks/retention_temperature.py --out bench-out/budget9 --tasks sst2,qnli
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
    p.add_argument("--out", default=str(REPO / "bench-out/budget9"), help="a benchmarks/budget.py output directory")
    p.add_argument("--tasks", default="sst2,agnews,qnli")
    p.add_argument("--max-eval", type=int, default=2500, help="as the budget run evaluated")
    p.add_argument("--draws", type=int, default=30, help="other shot draws to fit a temperature on (seeds 1..N)")
    p.add_argument("--tolerance", type=float, default=0.015)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from fscompile.backends.onnxruntime import OrtRunner
    from fscompile.config import CompileConfig
    from fscompile.evaluate import RETENTION_TEMPERATURE, fit_temperature, predict, retention_estimate
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
        seen = set()
        for man in sorted((Path(args.out) / "runs" / t).glob("*/manifest.json")):
            m = json.loads(man.read_text())
            sha = m["student"]["weights_sha256"]
            if sha in seen:
                continue
            seen.add(sha)
            model = man.parent / m["artifact"]["dir"]
            run = OrtRunner(model / m["artifact"]["model_file"])
            pred = predict(run, AutoTokenizer.from_pretrained(str(model)), run.names, task.eval, 128).argmax(-1)
            real = float((pred == y).mean()) / teacher_acc
            err = {T: retention_estimate(logits, pred, T) - real for T in (used, oracle)}
            line = (f"  {man.parent.name}: {len(m['student']['layers_kept'])} layers, real retention {real:.4f}, "
                    f"agreement {(pred == logits.argmax(-1)).mean():.3f}; estimate error {err[used]:+.4f} as used, "
                    f"{err[oracle]:+.4f} calibrated on the labels")
            if drawn:
                e = np.array([retention_estimate(logits, pred, T) - real for T in drawn])
                line += f", within {args.tolerance:.1%} on {(np.abs(e) <= args.tolerance).mean():.0%} of shot-fitted"
            print(line, flush=True)


if __name__ == "__main__":
    main()
