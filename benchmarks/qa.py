"""Extractive QA through fscompile (issue 19): a teacher fine-tuned here on SQuAD v1.1, distilled from a few shots.

    python benchmarks/qa.py --epochs 2 --seeds 3 --steps 300 --unlabeled 2000 --out bench-out/qa-squad11

../shared/data/squad_v1.1 holds the complete SQuAD v1.1 dev set (48 articles); 16 of them are the articles of
the SQuAD 2.0 subset in ../shared/data/squad_v2. The other 32 articles (7,595 questions) fine-tune the
teacher (the packaged all-MiniLM-L6-v2 body with a new span head, on this CPU) and are where the shots and
any --unlabeled questions come from; the 16 shared articles are the evaluation: SQuAD v1.1 rules on their
2,975 v1.1 questions, and SQuAD 2.0 rules on the 2.0 subset (6,078 questions, 3,168 unanswerable). Per
draw fscompile keeps 3 of the teacher's 6 layers, distils on 10 shots and their augmented variants (plus
the unlabelled questions) and builds the ORT INT8 artifact. Writes results.jsonl and table.md.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--data", default=str(SHARED / "data/squad_v1.1/dev-v1.1.json"))
    p.add_argument("--v2", default=str(SHARED / "data/squad_v2/dev-v2.0.cs224n-subset.json"),
                   help="SQuAD 2.0 file whose articles are held out and also scored with 2.0 rules")
    p.add_argument("--base", default="minilm", help="the encoder the teacher is fine-tuned from")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-4, help="the teacher's fine-tuning learning rate")
    p.add_argument("--teacher", default=None, help="a QA teacher to use as is (skips the fine-tune)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="shot draws (0: only rebuild the table from --out)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--layers", default="3")
    p.add_argument("--max-eval", type=int, default=1000)
    p.add_argument("--student-lr", type=float, default=None, help="fscompile --lr (default: fscompile's)")
    p.add_argument("--unlabeled", type=int, default=0,
                   help="questions of the teacher's articles (answers stripped) passed to fscompile --unlabeled")
    p.add_argument("--out", default=str(REPO / "bench-out/qa-squad11"))
    return p.parse_args()


def split_articles(src: Path, v2: Path, root: Path) -> None:
    """Articles not in the 2.0 file -> root/train-v1.1.json; the shared ones -> root/dev-v1.1.json."""
    raw = json.loads(src.read_text())
    held = {a["title"] for a in json.loads(v2.read_text())["data"]}
    root.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train-v1.1.json", False), ("dev-v1.1.json", True)):
        (root / name).write_text(json.dumps({"version": raw.get("version", "1.1"),
                                             "data": [a for a in raw["data"] if (a["title"] in held) == keep]}))


def unlabeled_pool(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` questions of part A, answers stripped, as a SQuAD file: raw questions on the
    user's own documents, which is what a real user of --unlabeled would have."""
    raw = json.loads((root / "train-v1.1.json").read_text())
    qas = [(a["title"], p["context"], q) for a in raw["data"] for p in a["paragraphs"] for q in p["qas"]]
    pick = sorted(np.random.default_rng(seed).permutation(len(qas))[:n].tolist())
    data = [{"title": qas[i][0], "paragraphs": [{"context": qas[i][1], "qas": [
        {"id": qas[i][2]["id"], "question": qas[i][2]["question"], "answers": [], "is_impossible": True}]}]}
        for i in pick]
    path = root.parent / "unlabeled.json"
    path.write_text(json.dumps({"version": "1.1", "data": data}))
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
    """Standard SQuAD fine-tuning on the training articles, over the same windows fscompile reads:
    AdamW, batch 16, 10% warm-up then linear decay."""
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
    from fscompile.backends.onnxruntime import OrtRunner
    from fscompile.config import CompileConfig, DistillConfig
    from fscompile.data.qa import load_qa_splits
    from fscompile.pipeline import build, distill_stage, resolve_backend
    from fscompile.tasks.qa import evaluate_qa, qa_length

    out = Path(args.out)
    results = Results(out)
    rows, record = results.rows, results.record
    teacher = Path(args.teacher) if args.teacher else out / "teacher"  # kept: a re-run can pass --teacher
    v2_rows = load_qa_splits(args.v2)[0]["all"]
    if len(v2_rows) > args.max_eval:  # a seeded sample across all its articles, as fscompile samples v1.1
        v2_rows = [v2_rows[i] for i in sorted(np.random.default_rng(0).choice(len(v2_rows), args.max_eval, replace=False))]

    def progress(stage: str, done: int, total: int, detail: str = "") -> None:
        if done == total or done % 100 == 0:
            print(f"  {stage} {done}/{total} {detail}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="fscompile-qa-") as tmp:
        data = Path(tmp) / "squad"
        split_articles(Path(args.data), Path(args.v2), data)
        saved = teacher / "fine-tune.json"
        if saved.exists():  # fine-tuned by an earlier run of this script
            info = json.loads(saved.read_text())
        elif args.teacher:
            info = {"teacher_steps": 0, "teacher_questions": 0}
        else:
            info = fine_tune_teacher(data, args.base, args.epochs, teacher, args.lr)
            saved.write_text(json.dumps(info))
        extra = {"unlabeled": str(unlabeled_pool(data, args.unlabeled))} if args.unlabeled else {}
        for seed in range(args.seeds):
            t = time.perf_counter()
            cfg = CompileConfig(teacher=str(teacher), data=str(data), shots=args.shots, seed=seed,
                                student_layers=args.layers, max_eval=args.max_eval,
                                distill=DistillConfig(steps=args.steps, lr=args.student_lr,
                                                      unlabeled=extra.get("unlabeled")))
            backend = resolve_backend(cfg)
            d = distill_stage(cfg, backend, progress)
            m = build(d, backend, cfg, Path(tmp) / f"run{seed}", progress, t)
            compile_s = time.perf_counter() - t
            # SQuAD 2.0 rules on the 2.0 subset (same articles): the same teacher, student and artifact
            v2 = evaluate_qa(dataclasses.replace(d.task, eval=v2_rows), d.teacher, d.student,
                             OrtRunner(Path(tmp) / f"run{seed}/model/model.onnx"), qa_length(cfg, d.teacher))
            for who in ("teacher", "student", "artifact"):
                met = m["metrics"][who]
                record({"seed": seed, "shots": args.shots, "model": who, **info,
                        **{k: met.get(k) for k in (*METRICS, "n", "has_answer_n")}, "size_mb": m["size_mb"][who],
                        "v2": {k: v2[who].get(k) for k in (*METRICS, "exact_match", "n")},
                        "b1_ms": m["profile"][who]["batch1"]["p50_ms"], "layers_kept": m["student"]["layers_kept"],
                        "compile_s": compile_s, "timings_s": m["timings_s"], "steps": m["distillation"]["steps"],
                        "unlabeled": args.unlabeled, "lr": args.student_lr, "best_step": m["distillation"]["best_step"],
                        "null_threshold": float(getattr(d.student.config, "null_score_diff_threshold", 0.0))
                        if who != "teacher" else 0.0, "validation": m["distillation"]["validation"]})
    if not rows:  # --seeds 0: rebuild the table from the rows already recorded
        rows = [json.loads(line) for line in results.path.read_text().splitlines() if line.strip()]
    summarise(rows, out, args)


def summarise(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    seeds = sorted({r["seed"] for r in rows})
    r0 = rows[0]
    lines = [f"SQuAD v1.1: teacher {args.base} + span head fine-tuned here on the 32 articles outside the SQuAD 2.0 "
             f"subset ({r0['teacher_questions']} questions, {r0['teacher_steps']} steps); {args.shots} shots from "
             f"those articles, {r0.get('unlabeled', 0)} unlabelled questions; evaluation on {r0['n']} v1.1 questions "
             f"of the 16 other articles and {r0['v2']['n']} questions of the 2.0 subset (same articles); "
             f"{r0['steps']} distillation steps; draws {seeds}.", "",
             "| model | v1.1 EM | v1.1 F1 (% of teacher) | 2.0 EM | 2.0 F1 | 2.0 answerable F1 | 2.0 abstained when "
             "unanswerable | agreement with teacher (v1.1) | MB | b1 p50 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    t_f1 = np.mean([r["f1"] for r in rows if r["model"] == "teacher"])

    def ms(vals: list[float]) -> str:
        return f"{np.mean(vals):.4f}" + (f" ± {np.std(vals):.4f}" if len(vals) > 1 else "")

    for who in ("teacher", "student", "artifact"):
        rs = [r for r in rows if r["model"] == who]
        v2 = [r["v2"] for r in rs]
        lines.append(f"| {who} | {ms([r['exact_match'] for r in rs])} | {ms([r['f1'] for r in rs])} "
                     f"({np.mean([r['f1'] for r in rs]) / t_f1:.1%}) | {ms([v['exact_match'] for v in v2])} "
                     f"| {ms([v['f1'] for v in v2])} | {ms([v['has_answer_f1'] for v in v2])} "
                     f"| {ms([v['no_answer_accuracy'] for v in v2])} | {np.mean([r['agreement'] for r in rs]):.3f} "
                     f"| {np.mean([r['size_mb'] for r in rs]):.1f} | {np.mean([r['b1_ms'] for r in rs]):.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
