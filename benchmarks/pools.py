"""Out-of-domain text pools for the few-shot benchmark's ``--unlabeled-file`` rows.

A user without in-domain text may still have text in the teacher's language. These pools are
news (AG News train descriptions) and Wikipedia sentences (the QNLI dev sentences), neither of
them movie reviews, 5,000 texts at most, shuffled with seed 0; labels and questions are dropped.

    python benchmarks/pools.py            # writes bench-out/pools/agnews.txt and wiki.txt
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FSCOMPILE_SHARED", REPO.parent / "shared"))


def write(texts: list[str], path: Path, n: int) -> None:
    random.Random(0).shuffle(texts)
    path.write_text("\n".join(texts[:n]) + "\n", encoding="utf-8")
    print(f"{path}: {min(n, len(texts))} texts")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "data"))
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--out", default=str(REPO / "bench-out/pools"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from fscompile.data.loaders import read_table

    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    # AG News marks line breaks with a backslash
    news = [r["content"].replace("\\", " ").strip() for r in read_table(data / "ag_news/train_subset_8000.csv")]
    write(news, out / "agnews.txt", args.n)
    write(sorted({r["sentence"].strip() for r in read_table(data / "glue_qnli/dev.tsv")}), out / "wiki.txt", args.n)


if __name__ == "__main__":
    main()
