"""Extractive QA through fscompile (issue 6): a SQuAD 2.0 teacher fine-tuned here, distilled from a few shots.

    python benchmarks/qa.py --epochs 2 --seeds 3 --steps 300 --max-eval 600 --out bench-out/qa

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
from common import REPO, SHARED, Results  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data/squad_v2/dev-v2.0.cs224n-subset.json"))
    p.add_argument("--base", default="minilm", help="the encoder the teacher is fine-tuned from")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", default="3")
    p.add_argument("--max-eval", type=int, default=600)
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


def fine_tune_teacher(root: Path, base: str, epochs: float, out: Path, max_length: int = 256) -> dict:
    """Standard SQuAD 2.0 fine-tuning on part A: answers mapped to token spans, unanswerable
    (or truncated) answers to [CLS]; AdamW 1e-4, batch 16, linear decay."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from fscompile.data.qa import load_qa_splits
    from fscompile.models.text import resolve_source

    torch.manual_seed(0)
    src = resolve_source(base)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForQuestionAnswering.from_pretrained(src)
    rows = load_qa_splits(str(root))[0]["train"]
    enc = tok([r.question for r in rows], [r.context for r in rows], truncation="only_second", max_length=max_length,
              padding="max_length", return_offsets_mapping=True, return_tensors="pt")
    starts, ends = [], []
    for i, r in enumerate(rows):
        s = e = 0  # [CLS]: no answer, or the answer was truncated away
        seq, offsets = enc.sequence_ids(i), enc["offset_mapping"][i].tolist()
        ctx = [j for j, k in enumerate(seq) if k == 1]
        if r.answers and ctx:
            a0, a1 = r.starts[0], r.starts[0] + len(r.answers[0])
            lo, hi = ctx[0], ctx[-1]
            if offsets[lo][0] <= a0 and offsets[hi][1] >= a1:
                s = lo
                while s <= hi and offsets[s][0] <= a0:
                    s += 1
                e = hi
                while e >= lo and offsets[e][1] >= a1:
                    e -= 1
                s, e = s - 1, e + 1
        starts.append(s)
        ends.append(e)
    y = torch.tensor(starts), torch.tensor(ends)
    steps = int(epochs * len(rows) / 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1 - k / steps))
    model.train()
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(rows), (16,), generator=gen)
        width = int(enc["attention_mask"][idx].sum(1).max())
        res = model(input_ids=enc["input_ids"][idx, :width], attention_mask=enc["attention_mask"][idx, :width],
                    token_type_ids=enc["token_type_ids"][idx, :width], start_positions=y[0][idx], end_positions=y[1][idx])
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            print(f"teacher step {step}/{steps} loss {res.loss.item():.3f}", file=sys.stderr, flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"teacher_steps": steps, "teacher_train_s": time.perf_counter() - t, "teacher_questions": len(rows)}


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    import fscompile

    out = Path(args.out)
    results = Results(out)
    rows, record = results.rows, results.record

    with tempfile.TemporaryDirectory(prefix="fscompile-qa-") as tmp:
        data, teacher = Path(tmp) / "squad", Path(tmp) / "teacher"
        split_articles(Path(args.data), data)
        info = fine_tune_teacher(data, args.base, args.epochs, teacher)
        for seed in range(args.seeds):
            t = time.perf_counter()
            m = fscompile.compile(str(teacher), data=str(data), shots=args.shots, seed=seed, steps=args.steps,
                                  student_layers=args.layers, max_eval=args.max_eval, out=Path(tmp) / "run", force=True)
            met = m["metrics"]
            for who in ("teacher", "student", "artifact"):
                record({"seed": seed, "shots": args.shots, "model": who, **info,
                        **{k: met[who][k] for k in ("exact_match", "f1", "agreement", "n")},
                        "size_mb": m["size_mb"][who], "b1_ms": m["profile"][who]["batch1"]["p50_ms"],
                        "layers_kept": m["student"]["layers_kept"], "compile_s": time.perf_counter() - t})
    lines = [f"SQuAD 2.0 subset: teacher {args.base} + span head fine-tuned here on part A "
             f"({info['teacher_questions']} questions, {info['teacher_steps']} steps); {args.shots} answerable + "
             f"{args.shots} unanswerable shots from part A; evaluation on {rows[0]['n']} questions of part B "
             f"(other articles); seeds 0-{args.seeds - 1}.", "",
             "| model | EM (mean ± std) | F1 (mean ± std) | agreement with teacher | MB | b1 p50 ms |", "|---|---|---|---|---|---|"]
    table = []
    t_f1 = np.mean([r["f1"] for r in rows if r["model"] == "teacher"])
    for who in ("teacher", "student", "artifact"):
        rs = [r for r in rows if r["model"] == who]
        em, f1 = [r["exact_match"] for r in rs], [r["f1"] for r in rs]
        table.append({"model": who, "em": float(np.mean(em)), "em_std": float(np.std(em)), "f1": float(np.mean(f1)),
                      "f1_std": float(np.std(f1)), "f1_retention": float(np.mean(f1) / t_f1)})
        lines.append(f"| {who} | {np.mean(em):.4f} ± {np.std(em):.4f} | {np.mean(f1):.4f} ± {np.std(f1):.4f} "
                     f"({np.mean(f1) / t_f1:.1%}) | {np.mean([r['agreement'] for r in rs]):.3f} | "
                     f"{np.mean([r['size_mb'] for r in rs]):.1f} | {np.mean([r['b1_ms'] for r in rs]):.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
