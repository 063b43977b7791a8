"""Compile to a budget, leave one task out (issue 20).

    python benchmarks/finetune_teacher.py --task qnli      # the QNLI teacher and data, first
    python benchmarks/budget.py --tasks sst2,agnews,qnli --out bench-out/budget

Phase 1, the memory: on every task, the fixed default recipe and the other fixed recipes of
``--recipes`` are compiled; each build lands in that task's recipe memory.
Phase 2, the search: on each task in turn, fscompile searches under two budgets, each with a memory
of the *other* tasks' rows only and with an empty memory (``--arms``):
  default  what the default recipe met on this task: its latency (re-measured, +15%: ``--latency-slack``) and its
           estimated retention (less ``--retention-slack``); the reference is the default build
  tight    what the smallest fixed recipe (the last of ``--recipes``) met: its size (+5%), latency
           (the same slack) and estimated retention (less the slack), which the default recipe cannot meet; the
           reference is that fixed build
Reported: distillations spent, the pick's latency (timed side by side with the reference) and real
retention against the reference's, and how the label-free retention estimate tracked real
retention on every build.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import REPO, SHARED, Results

SIZE_SLACK = 1.05
# "as fast as the reference", side by side: picks that were the reference's own file measured 0.99-1.01x (runs 6-7)
SAME_SPEED = 1.03

TASKS = {  # name: (teacher, data)
    "sst2": (str(SHARED / "teachers/minilm-sst2"), str(SHARED / "data/glue_sst2")),
    "agnews": ("minilm", str(SHARED / "data/ag_news")),
    # QNLI with minilm adapted on the shots is at chance (0.492): a teacher fine-tuned on 3,000 pairs instead
    "qnli": (str(REPO / "bench-out/qnli/teacher"), str(REPO / "bench-out/qnli/data")),
    "sentiment": ("minilm", None),  # the embedded default set
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,agnews")
    p.add_argument("--recipes", default="default,2:0.2:4",
                   help="fixed recipes for the memory: 'default', or layers:prune:embedding-bits")
    p.add_argument("--search", help="tasks to search (default: every task of --tasks)")
    p.add_argument("--arms", default="default,default-no-memory,tight,tight-no-memory",
                   help="searches per task: default or tight budget, with or without the other tasks' memory")
    p.add_argument("--retention-slack", type=float, default=0.005,
                   help="budget retention = the reference's estimate minus this: the same recipe's estimate moves "
                        "0.5-0.6 points between runs and layer choices here (0 in the first runs)")
    p.add_argument("--latency-slack", type=float, default=1.15,
                   help="budget latency = the reference re-measured times this; this VM's batch-1 latency moves by up "
                        "to a third between minutes, so at 1.15 a miss can be the minute's (runs 5-8)")
    # QNLI's whole dev split (2,463 rows): on 1,000 rows, a 2-layer build's measured retention strays 1.9 points
    # by sampling alone, more than the 1.5 the estimate is judged by (runs 5-7 used 1,000)
    p.add_argument("--max-eval", type=int, default=2500)
    p.add_argument("--max-trials", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench-out/budget"))
    return p.parse_args()


def row(task: str, kind: str, m: dict, seconds: float) -> dict:
    met = m["metrics"]
    return {"task": task, "kind": kind, "layers": m["student"]["layers_kept"],
            "prune": (m["student"].get("prepare") or {}).get("rate"), "embedding_bits": m["config"]["embedding_bits"],
            "latency_ms": m["profile"]["artifact"]["batch1"]["p50_ms"], "size_mb": m["size_mb"]["artifact"],
            "retention": met["artifact"]["accuracy"] / met["teacher"]["accuracy"],
            "retention_estimate": met["artifact"]["retention_estimate"], "agreement": met["artifact"]["agreement"],
            "retention_estimates": met["artifact"].get("retention_estimates"),
            "teacher_accuracy": met["teacher"]["accuracy"], "accuracy": met["artifact"]["accuracy"],
            "search": m.get("search"), "seconds": round(seconds, 1), "cpu": m["device"]["cpu"]["model"]}


def default_latency(run: Path, times: int = 3) -> float:
    """Median batch-1 p50 of ``times`` fresh-process profiles of a compiled artifact (128 tokens)."""
    import numpy as np

    from fscompile.profile import ProfileRequest, profile_model

    req = ProfileRequest("onnx", str(run / "model" / "model.onnx"), 30000, 128, batches=(1,))
    return float(np.median([profile_model(req)["batch1"]["p50_ms"] for _ in range(times)]))


def side_by_side(a: Path, b: Path, seq_len: int = 128, rounds: int = 7) -> dict:
    """Batch-1 latency of two artifacts timed in turns in one process (same machine state), p50 each
    and the ratio b / a: what "as fast as the default" means when runs differ by 30%."""
    from fscompile.backends.onnxruntime import OrtRunner
    from fscompile.profile import in_turns, synthetic_inputs

    runs = [OrtRunner(p / "model" / "model.onnx") for p in (a, b)]
    feeds = [synthetic_inputs(r.names, 1, seq_len, 30000) for r in runs]
    p50 = in_turns([lambda r=r, f=f: r(f) for r, f in zip(runs, feeds)], rounds=rounds, budget_s=0.5 * rounds)
    return {"default_ms": p50[0], "pick_ms": p50[1], "ratio": p50[1] / p50[0]}


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    import fscompile
    from fscompile.errors import FscompileError

    out = Path(args.out)
    results = Results(out)
    tasks = args.tasks.split(",")
    mem = {t: out / f"memory-{t}.jsonl" for t in tasks}
    done = {}
    if results.path.is_file():  # a rerun resumes: fixed builds already measured are kept
        done = {(r["task"], r["kind"]): r for r in map(json.loads, results.path.read_text().splitlines())}
    for t in tasks:  # phase 1
        teacher, data = TASKS[t]
        for recipe in args.recipes.split(","):
            if (t, f"fixed {recipe}") in done:
                results.rows.append(done[(t, f"fixed {recipe}")])
                continue
            opts = {}
            if recipe != "default":
                k, p, b = recipe.split(":")
                opts = {"student_layers": k, "prune": float(p), "embedding_bits": int(b)}
            os.environ["FSCOMPILE_MEMORY"] = str(mem[t])
            start = time.perf_counter()
            m = fscompile.compile(teacher, data=data, shots=10, max_eval=args.max_eval, out=out / "runs" / t / recipe,
                                  force=True, **opts)
            results.record(row(t, f"fixed {recipe}", m, time.perf_counter() - start))
    for t in (args.search.split(",") if args.search else tasks):  # phase 2
        teacher, data = TASKS[t]
        for arm in args.arms.split(","):
            tight = arm.startswith("tight")
            ref_name = args.recipes.split(",")[-1] if tight else "default"
            ref = next(r for r in results.rows if (r["task"], r["kind"]) == (t, f"fixed {ref_name}"))
            memory_file = out / f"memory-{t}-{arm}.jsonl"
            if arm.endswith("no-memory"):
                memory_file.write_text("")
            else:
                memory_file.write_text("".join(mem[o].read_text() for o in tasks if o != t and mem[o].is_file()))
            os.environ["FSCOMPILE_MEMORY"] = str(memory_file)
            rows_before = sum(1 for _ in memory_file.open())
            # the reference's own figures, latency re-measured now (median of 3 profiles, as a compile profiles)
            # with slack: the same artifact measured 2.07 and 2.71 ms in two runs here, so a budget at
            # exactly one figure is a coin toss, not a test
            est = ref["retention_estimate"]
            ref_dir = out / "runs" / t / ref_name
            budget = {"max_latency_ms": round(args.latency_slack * default_latency(ref_dir), 2),
                      "min_retention": round(est - args.retention_slack, 3)}
            if tight:
                budget["max_size_mb"] = round(SIZE_SLACK * ref["size_mb"], 1)
            run_dir = out / "runs" / t / f"search-{arm}"
            start = time.perf_counter()
            try:
                m = fscompile.compile(teacher, data=data, shots=10, max_eval=args.max_eval, out=run_dir,
                                      force=True, max_trials=args.max_trials, **budget)
                r = row(t, f"search {arm}", m, time.perf_counter() - start)
                r.update(budget=budget, memory_rows=rows_before, reference=ref_name,
                         reference_retention=ref["retention"], reference_estimate=est,
                         candidates=json.loads((run_dir / "search.json").read_text())["candidates"],
                         vs_reference=side_by_side(ref_dir, run_dir))
                results.record(r)
            except FscompileError as e:  # the miss is a result too
                results.record({"task": t, "kind": f"search {arm}", "budget": budget, "failed": str(e),
                                "memory_rows": rows_before, "candidates": getattr(e, "report", {}).get("candidates")})
    lines = ["| task | build | layers | prune | table | ms | MB | retention (real) | estimate | distillations |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.rows:
        if "failed" in r:
            lines.append(f"| {r['task']} | {r['kind']}, budget {r['budget']} | failed: {r['failed']} |")
            continue
        trials = r["search"]["trials"] if r.get("search") else "—"
        lines.append(f"| {r['task']} | {r['kind']} | {len(r['layers'])} | {r['prune'] or 0:g} | {r['embedding_bits']} "
                     f"| {r['latency_ms']:.2f} | {r['size_mb']:.1f} | {r['retention']:.4f} | "
                     f"{r['retention_estimate']:.4f} | {trials} |")
    searches = [r for r in results.rows if r["kind"].startswith("search")]
    met = [r for r in searches if "failed" not in r]
    good = [r for r in met if r["retention"] >= r["reference_retention"] and r["vs_reference"]["ratio"] <= SAME_SPEED]
    lines += ["", f"{len(met)} of {len(searches)} budgets met within {args.max_trials} distillations; {len(good)} picks at "
                  f"least as good as the reference on real retention and on latency side by side (<= {SAME_SPEED}x)"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
