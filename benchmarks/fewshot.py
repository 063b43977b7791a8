"""Few-shot distillation benchmark (issue 3): how much of the teacher a compiled INT8 student keeps.

    python benchmarks/fewshot.py --shots 5,10,20 --seeds 5 --layers every-other,2 --out bench-out/fewshot

(artifacts with 4-bit word embeddings by default: --embedding-bits 8 for the faster, larger variant)

For every shot count and draw (seed), in one run and on the same shots:
  fscompile          the full pipeline (transfer set, KD + hidden-state matching, INT8 artifact)
  fscompile+unlab    the same with N unlabeled sentences from the train split (--unlabeled N)
  (a) fine-tune      the same student fine-tuned on the shots alone, no teacher
  (b) logit KD       the student with plain logit KD on the raw shots only (the first version)
  (c) teacher        the teacher itself (PyTorch fp32)
  (d) teacher INT8   the teacher through ONNX Runtime dynamic INT8 (what optimum-cli gives)
Writes results.jsonl (one row per run, appended), table.md and table.json (mean ± std).
Paths default to ../shared and can be overridden with --teacher/--data or FSCOMPILE_SHARED.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FSCOMPILE_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(SHARED / "teachers/minilm-sst2"))
    p.add_argument("--data", default=str(SHARED / "data/glue_sst2"))
    p.add_argument("--shots", default="5,10,20", help="shots per class, comma-separated")
    p.add_argument("--seeds", type=int, default=5, help="shot draws per shot count (seeds 0..N-1)")
    p.add_argument("--layers", default="every-other,2",
                   help="students, comma-separated: every-other (fscompile's default) or a count of layers chosen "
                        "by measured effect")
    p.add_argument("--unlabeled", type=int, default=0, help="also run with N unlabeled train sentences")
    p.add_argument("--unlabeled-file", action="append", default=[],
                   help="also run with this text file as the unlabeled pool (e.g. out-of-domain text); repeatable")
    p.add_argument("--generator", default="smollm2", help="fscompile's --generator (none: the shots alone; rows are "
                   "labelled when it is not the default)")
    p.add_argument("--generate", type=int, default=None, help="fscompile's --generate (rows are labelled with it)")
    p.add_argument("--steps", type=int, default=None, help="fscompile's --steps (rows are labelled with it)")
    p.add_argument("--batch-size", type=int, default=None, help="fscompile's --batch-size (rows are labelled with it)")
    p.add_argument("--pools-only", action="store_true", help="only the --unlabeled/--unlabeled-file rows")
    p.add_argument("--lr", type=float, default=None, help="fscompile's --lr (rows are labelled with it)")
    p.add_argument("--embedding-bits", type=int, default=4, help="word-embedding bits of the artifact (4 or 8)")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="fscompile's bf16 autocast while distilling (rows are labelled when not auto)")
    p.add_argument("--prune-heads", action="store_true", help="prune attention heads as well as FFN channels")
    p.add_argument("--ops", default=None, help="transfer-set augmentations (fscompile's --augment-ops); rows are labelled "
                   "'fscompile ops=...' so they sit next to the default ones")
    p.add_argument("--baselines", default="finetune,logitkd,teacher,teacher-int8")
    p.add_argument("--out", default=str(REPO / "bench-out/fewshot"))
    p.add_argument("--max-eval", type=int, default=None)
    return p.parse_args()


def student_accuracy(student, task) -> float:
    from fscompile.evaluate import metrics, predict, torch_runner

    labels = np.array([e.label for e in task.eval])
    logits = predict(torch_runner(student), student.tokenizer, student.input_names, task.eval)
    return metrics(logits, labels)["accuracy"]


def finetune_on_shots(teacher, task, layers: list[int], seed: int, steps: int = 200, lr: float = 1e-4) -> float:
    """Baseline (a): the derived student trained with cross-entropy on the shots, no teacher."""
    import torch
    import torch.nn.functional as F

    from fscompile.distill import Batcher, set_seed
    from fscompile.models.text import derive_student

    set_seed(seed)
    student, _ = derive_student(teacher, layers)
    pairs = [s.text_pair or "" for s in task.shots] if task.is_pair else None
    batcher = Batcher(student, [s.text for s in task.shots], pairs, 128)
    y = torch.tensor([s.label for s in task.shots])
    opt = torch.optim.AdamW(student.module.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    student.module.train()
    for _ in range(steps):
        idx = rng.choice(len(y), size=min(16, len(y)), replace=False).tolist()
        loss = F.cross_entropy(student.module(**batcher.batch(idx)).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.module.eval()
    return student_accuracy(student, task)


def logit_kd_raw_shots(teacher, task, layers: list[int], seed: int, steps: int = 300) -> float:
    """Baseline (b): logit-only KD on the raw shots (no augmentation, no inner matching)."""
    from fscompile.augment import build_transfer_set
    from fscompile.config import DistillConfig
    from fscompile.distill import distill
    from fscompile.models.text import derive_student

    student, keep = derive_student(teacher, layers)
    ts = build_transfer_set(task.shots, 0, seed, "[MASK]")
    distill(teacher, student, ts, keep, DistillConfig(steps=steps, hidden_weight=0.0, evals=0), seed)
    return student_accuracy(student, task)


def teacher_int8(teacher, task, work: Path) -> dict[str, float]:
    """Baseline (d): the teacher exported to ONNX and quantized by ORT's dynamic INT8."""
    from fscompile.backends.onnxruntime import OrtRunner, dynamic_int8

    from fscompile.evaluate import metrics, predict
    from fscompile.models.text import export_onnx

    raw, q = work / "teacher.onnx", work / "teacher-int8.onnx"
    export_onnx(teacher, raw)
    dynamic_int8(raw, q, fused=False)
    labels = np.array([e.label for e in task.eval])
    logits = predict(OrtRunner(q), teacher.tokenizer, teacher.input_names, task.eval)
    return {"accuracy": metrics(logits, labels)["accuracy"], "size_mb": q.stat().st_size / 2**20}


def unlabeled_file(data: str, task, n: int, seed: int, work: Path) -> str:
    """N train sentences, none of them a shot, as a .txt file (the users' raw in-domain text)."""
    from fscompile.data.loaders import load_splits

    splits, _ = load_splits(data)
    col = task.columns["text"]
    shots = {s.text for s in task.shots}
    texts = [str(r[col]).strip() for r in splits[task.shot_split] if str(r[col]).strip() not in shots]
    random.Random(seed).shuffle(texts)
    path = work / f"unlabeled-{seed}.txt"
    path.write_text("\n".join(texts[:n]) + "\n")
    return str(path)


def summarise(rows: list[dict], out: Path) -> str:
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["layers"], r["shots"]), []).append(r["accuracy"])
    teacher_acc = np.mean([r["accuracy"] for r in rows if r["method"] == "(c) teacher"] or [np.nan])
    shots = sorted({r["shots"] for r in rows})
    lines = ["| method | student layers | " + " | ".join(f"{s} shots: acc (% of teacher)" for s in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    table = []
    for (method, layers) in dict.fromkeys((m, l) for m, l, _ in cells):
        row = {"method": method, "layers": layers}
        cols = []
        for s in shots:
            v = cells.get((method, layers, s))
            if not v:
                cols.append("—")
                continue
            mean, std = float(np.mean(v)), float(np.std(v))
            row[str(s)] = {"mean": mean, "std": std, "n": len(v), "retention": mean / teacher_acc}
            cols.append(f"{mean:.4f} ± {std:.4f} ({mean / teacher_acc:.1%}, n={len(v)})")
        table.append(row)
        lines.append(f"| {method} | {layers} | " + " | ".join(cols) + " |")
    extra = [r for r in rows if r["method"].startswith("fscompile")]
    if extra:
        lines += ["", "| method | layers | shots | mean artifact MB | × smaller than fp32 teacher | mean compile s |",
                  "|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in extra:
            groups.setdefault((r["method"], r["layers"], r["shots"]), []).append(r)
        for (m, l, s), rs in groups.items():
            lines.append(f"| {m} | {l} | {s} | {np.mean([r['size_mb'] for r in rs]):.1f} | "
                         f"{np.mean([r['compression'] for r in rs]):.1f} | {np.mean([r['compile_s'] for r in rs]):.0f} |")
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    (out / "table.json").write_text(json.dumps(table, indent=2))
    return md


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    import fscompile
    from fscompile.data import load_task_data
    from fscompile.models.text import load_teacher
    from fscompile.tasks.text import to_teacher_labels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = set()
    rows = []
    if results.exists():  # resume: skip runs already recorded
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        done = {(r["method"], r["layers"], r["shots"], r["seed"]) for r in rows}

    def record(row: dict) -> None:
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    baselines = set(args.baselines.split(",")) if args.baselines else set()
    teacher = None
    with tempfile.TemporaryDirectory(prefix="fscompile-bench-") as tmp:
        work = Path(tmp)
        for shots in [int(s) for s in args.shots.split(",")]:
            for seed in range(args.seeds):
                task = load_task_data(args.data, shots, seed, max_eval=args.max_eval)
                if teacher is None:
                    teacher = load_teacher(args.teacher, task.label_names)
                task = to_teacher_labels(task, teacher)
                base = {"shots": shots, "seed": seed}
                if "teacher" in baselines and ("(c) teacher", "-", shots, seed) not in done:
                    record({**base, "method": "(c) teacher", "layers": "-",
                            "accuracy": student_accuracy(teacher, task)})
                if "teacher-int8" in baselines and ("(d) teacher INT8", "-", shots, seed) not in done:
                    record({**base, "method": "(d) teacher INT8", "layers": "-", **teacher_int8(teacher, task, work)})
                for layers in args.layers.split(","):
                    keep: list[int] | None = None
                    tag = ((" shots only" if args.generator == "none" else
                            f" generator={Path(args.generator).name}" if args.generator != "smollm2" else "")
                           + (f" gen={args.generate}" if args.generate is not None else "")
                           + (f" bf16={args.bf16}" if args.bf16 != "auto" else "")
                           + (f" emb={args.embedding_bits}bit" if args.embedding_bits != 4 else "")
                           + (f" ops={args.ops}" if args.ops else "") + (f" lr={args.lr:g}" if args.lr else "")
                           + (f" steps={args.steps}" if args.steps else "")
                           + (f" batch={args.batch_size}" if args.batch_size else ""))
                    variants = [] if args.pools_only else [("fscompile" + tag, None)]
                    if args.unlabeled:
                        variants.append((f"fscompile+{args.unlabeled} unlabeled" + tag,
                                         unlabeled_file(args.data, task, args.unlabeled, seed, work)))
                    variants += [(f"fscompile+pool {Path(f).name}" + tag, f) for f in args.unlabeled_file]
                    for method, unl in variants:
                        if (method, layers, shots, seed) in done:
                            keep = keep or next(r["layers_kept"] for r in rows if r["method"] == method
                                                and (r["layers"], r["shots"], r["seed"]) == (layers, shots, seed))
                            continue
                        t = time.perf_counter()
                        m = fscompile.compile(args.teacher, data=args.data, target="ort-int8", shots=shots, seed=seed,
                                              student_layers=layers, steps=args.steps, unlabeled=unl,
                                              embedding_bits=args.embedding_bits, prune_heads=args.prune_heads,
                                              generator=args.generator, bf16=args.bf16,
                                              **({"generate": args.generate} if args.generate is not None else {}),
                                              **({"lr": args.lr} if args.lr else {}),
                                              **({"batch_size": args.batch_size} if args.batch_size else {}),
                                              **({"ops": args.ops} if args.ops else {}),
                                              max_eval=args.max_eval, out=work / "run", force=True)
                        record({**base, "method": method, "layers": layers,
                                "accuracy": m["metrics"]["artifact"]["accuracy"],
                                "student_accuracy": m["metrics"]["student"]["accuracy"],
                                "agreement": m["metrics"]["artifact"]["agreement"],
                                "size_mb": m["size_mb"]["artifact"], "variant": m["artifact"].get("variant"),
                                "compression": m["compression"]["size_ratio_vs_teacher"],
                                "compile_s": time.perf_counter() - t, "timings": m["timings_s"],
                                "teacher_s": m["distillation"].get("teacher_seconds"),
                                "steps": m["distillation"]["steps"], "best_step": m["distillation"]["best_step"],
                                "sources": m["distillation"].get("sources"),
                                "layers_kept": m["student"]["layers_kept"], "prepare": m["student"]["prepare"],
                                "b1_ms": m["profile"]["artifact"]["batch1"]["p50_ms"],
                                "unpruned_b1_ms": m["verification"]["checks"].get("pruning_pays", {}).get("unpruned_ms")})
                        keep = keep or m["student"]["layers_kept"]
                    # the baselines use the layers fscompile chose, so only the training differs
                    if "finetune" in baselines and ("(a) fine-tune on shots", layers, shots, seed) not in done:
                        record({**base, "method": "(a) fine-tune on shots", "layers": layers,
                                "accuracy": finetune_on_shots(teacher, task, keep, seed)})
                    if "logitkd" in baselines and ("(b) logit KD, raw shots", layers, shots, seed) not in done:
                        record({**base, "method": "(b) logit KD, raw shots", "layers": layers,
                                "accuracy": logit_kd_raw_shots(teacher, task, keep, seed)})
    print(summarise(rows, out))


if __name__ == "__main__":
    main()
