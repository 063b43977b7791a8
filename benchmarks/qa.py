"""Extractive QA through fscompile (issue 6): a SQuAD 2.0 teacher fine-tuned here, distilled from a few shots.

    python benchmarks/qa.py --epochs 3 --seeds 3 --steps 300 --max-eval 600 --out bench-out/qa

Only a SQuAD 2.0 dev subset is stored in ../shared/data, so its articles are cut in two (seeded):
part A fine-tunes the teacher (the packaged all-MiniLM-L6-v2 body with a new span head, on this CPU)
and is where the shots come from; part B, other articles, is the evaluation set. Per draw:
fscompile keeps 3 of the teacher's 6 layers (evenly spaced), distils on the shots (10 answerable +
10 unanswerable questions) and their augmented variants, and builds the ORT INT8 artifact.
Writes results.jsonl, table.md and table.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, Results


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data/squad_v2/dev-v2.0.cs224n-subset.json"))
    p.add_argument("--base", default="minilm", help="the encoder the teacher is fine-tuned from")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-4, help="the teacher's fine-tuning learning rate")
    p.add_argument("--teacher", default=None, help="a SQuAD 2.0 teacher to use as is (skips the fine-tune)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="shot draws (0: only rebuild the table from --out)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", default="3")
    p.add_argument("--max-eval", type=int, default=600)
    p.add_argument("--student-lr", type=float, default=None, help="fscompile --lr (default: fscompile's)")
    p.add_argument("--unlabeled", type=int, default=0,
                   help="questions of part A (answers stripped) passed to fscompile --unlabeled")
    p.add_argument("--out", default=str(REPO / "bench-out/qa"))
    return p.parse_args()


def split_articles(src: Path, root: Path, seed: int = 0) -> None:
    """Half of the articles -> root/train-v2.0.json (part A), the rest -> root/dev-v2.0.json (part B)."""
    raw = json.loads(src.read_text())
    order = np.random.default_rng(seed).permutation(len(raw["data"]))
    half = len(order) // 2
    root.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train-v2.0.json", order[:half]), ("dev-v2.0.json", order[half:])):
        (root / name).write_text(json.dumps({"version": raw.get("version", "v2.0"),
                                             "data": [raw["data"][i] for i in sorted(idx)]}))


def unlabeled_pool(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` questions of part A, answers stripped, as a SQuAD file: raw questions on the
    user's own documents, which is what a real user of --unlabeled would have."""
    raw = json.loads((root / "train-v2.0.json").read_text())
    qas = [(a["title"], p["context"], q) for a in raw["data"] for p in a["paragraphs"] for q in p["qas"]]
    pick = sorted(np.random.default_rng(seed).permutation(len(qas))[:n].tolist())
    data = [{"title": qas[i][0], "paragraphs": [{"context": qas[i][1], "qas": [
        {"id": qas[i][2]["id"], "question": qas[i][2]["question"], "answers": [], "is_impossible": True}]}]}
        for i in pick]
    path = root.parent / "unlabeled.json"
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def span_targets(enc, rows) -> tuple[list[int], list[int]]:
    """Per window, the answer's first and last token, or [CLS] (0) where the question has no
    answer or the answer is not inside that window (Hugging Face's run_qa convention)."""
    starts, ends = [], []
    for f, i in enumerate(enc["overflow_to_sample_mapping"]):
        r, s, e = rows[i], 0, 0
        ctx = [j for j, k in enumerate(enc.sequence_ids(f)) if k == 1]
        offsets = enc["offset_mapping"][f]
        if r.answers and ctx:
            a0, a1 = r.starts[0], r.starts[0] + len(r.answers[0])
            inside = [j for j in ctx if offsets[j][0] < a1 and offsets[j][1] > a0]
            if inside and offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                s, e = inside[0], inside[-1]
        starts.append(s)
        ends.append(e)
    return starts, ends


def fine_tune_teacher(root: Path, base: str, epochs: float, out: Path, lr: float, max_length: int = 384) -> dict:
    """Standard SQuAD 2.0 fine-tuning on part A, over the same windows fscompile reads: AdamW,
    batch 16, 10% warm-up then linear decay."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from fscompile.data.batching import pad_batch
    from fscompile.data.qa import load_qa_splits
    from fscompile.distill import EpochSampler, update, use_bf16
    from fscompile.models.text import resolve_source
    from fscompile.tasks.qa import windows

    torch.manual_seed(0)
    src = resolve_source(base)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForQuestionAnswering.from_pretrained(src)
    rows = load_qa_splits(str(root))[0]["train"]
    enc = windows(tok, [r.question for r in rows], [r.context for r in rows], max_length, offsets=True)
    y = [torch.tensor(v) for v in span_targets(enc, rows)]
    n = len(enc["input_ids"])
    steps = int(epochs * n / 16)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warm, max(0.0, (steps - k) / (steps - warm))))
    model.train()
    t = time.perf_counter()
    sampler = EpochSampler(n, 16, np.random.default_rng(0))
    params = list(model.parameters())
    for step in range(steps):
        idx = sampler.next()
        batch = {k: torch.from_numpy(v) for k, v in pad_batch(enc, idx, ["input_ids", "attention_mask", "token_type_ids"],
                                                               tok.pad_token_id or 0).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16("auto")):  # as fscompile trains
            res = model(**batch, start_positions=y[0][idx], end_positions=y[1][idx])
        update(res.loss, opt, sched, params)
        if step % 25 == 0:
            print(f"teacher step {step}/{steps} loss {res.loss.item():.3f}", file=sys.stderr, flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"teacher_steps": steps, "teacher_train_s": time.perf_counter() - t, "teacher_questions": len(rows),
            "teacher_windows": n}


METRICS = ("exact_match", "f1", "has_answer_f1", "no_answer_accuracy", "agreement")


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    import fscompile

    out = Path(args.out)
    results = Results(out)
    rows, record = results.rows, results.record

    teacher = Path(args.teacher) if args.teacher else out / "teacher"  # kept: a re-run can pass --teacher
    with tempfile.TemporaryDirectory(prefix="fscompile-qa-") as tmp:
        data = Path(tmp) / "squad"
        split_articles(Path(args.data), data)
        if args.teacher:  # what this script recorded when it fine-tuned that teacher, if it did
            saved = teacher / "fine-tune.json"
            info = json.loads(saved.read_text()) if saved.exists() else {"teacher_steps": 0, "teacher_questions": 0}
        else:
            info = fine_tune_teacher(data, args.base, args.epochs, teacher, args.lr)
            (teacher / "fine-tune.json").write_text(json.dumps(info))
        extra = {"unlabeled": str(unlabeled_pool(data, args.unlabeled))} if args.unlabeled else {}
        if args.student_lr:
            extra["lr"] = args.student_lr
        for seed in range(args.seeds):
            t = time.perf_counter()
            m = fscompile.compile(str(teacher), data=str(data), shots=args.shots, seed=seed, steps=args.steps,
                                  student_layers=args.layers, max_eval=args.max_eval, out=Path(tmp) / "run", force=True,
                                  **extra)
            met = m["metrics"]
            for who in ("teacher", "student", "artifact"):
                record({"seed": seed, "shots": args.shots, "model": who, **info,
                        **{k: met[who][k] for k in (*METRICS, "n", "has_answer_n")}, "size_mb": m["size_mb"][who],
                        "b1_ms": m["profile"][who]["batch1"]["p50_ms"], "layers_kept": m["student"]["layers_kept"],
                        "compile_s": time.perf_counter() - t, "timings_s": m["timings_s"],
                        "steps": args.steps, "unlabeled": args.unlabeled, "lr": args.student_lr,
                        "losses": m["distillation"]["losses"], "best_step": m["distillation"]["best_step"],
                        "null_threshold": json.loads((Path(tmp) / "run/model/config.json").read_text())
                        .get("null_score_diff_threshold", 0.0) if who != "teacher" else 0.0,
                        "validation": m["distillation"]["validation"]})
    if not rows:  # --seeds 0: rebuild the table from the rows already recorded
        rows = [json.loads(line) for line in results.path.read_text().splitlines() if line.strip()]
    seeds = sorted({r["seed"] for r in rows})
    n_has = rows[0].get("has_answer_n", "?")
    lines = [f"SQuAD 2.0 subset: teacher {args.base} + span head fine-tuned here on part A "
             f"({info['teacher_questions']} questions, {info['teacher_steps']} steps); {args.shots} answerable + "
             f"{args.shots} unanswerable shots from part A; evaluation on {rows[0].get('n', args.max_eval)} questions of part B "
             f"(other articles; {n_has} answerable); {rows[0].get('steps', args.steps)} distillation steps; "
             f"{rows[0].get('unlabeled', 0)} unlabeled questions of part A; seeds {seeds}.", "",
             "| model | EM | F1 (% of teacher) | F1 answerable | abstained when unanswerable | agreement with teacher "
             "| MB | b1 p50 ms |", "|---|---|---|---|---|---|---|---|"]
    table = []
    t_f1 = np.mean([r["f1"] for r in rows if r["model"] == "teacher"])

    def ms(rs: list[dict], k: str) -> str:
        return f"{np.mean([r[k] for r in rs]):.4f} ± {np.std([r[k] for r in rs]):.4f}"

    for who in ("teacher", "student", "artifact"):
        rs = [r for r in rows if r["model"] == who]
        table.append({"model": who, **{k: float(np.mean([r[k] for r in rs])) for k in METRICS},
                      **{f"{k}_std": float(np.std([r[k] for r in rs])) for k in METRICS},
                      "f1_retention": float(np.mean([r["f1"] for r in rs]) / t_f1), "draws": len(rs)})
        lines.append(f"| {who} | {ms(rs, 'exact_match')} | {ms(rs, 'f1')} ({table[-1]['f1_retention']:.1%}) "
                     f"| {ms(rs, 'has_answer_f1')} | {ms(rs, 'no_answer_accuracy')} "
                     f"| {np.mean([r['agreement'] for r in rs]):.3f} | {np.mean([r['size_mb'] for r in rs]):.1f} "
                     f"| {np.mean([r['b1_ms'] for r in rs]):.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
