"""Compile time of the default command on inputs that fill 128 tokens (issue 18): where the time goes.

    python benchmarks/long_inputs.py --seeds 1 --out bench-out/long-inputs

The task: SQuAD v1.1 dev paragraphs (Wikipedia, 110-150 words, 150-200 tokens) labelled by the article they
come from, the --classes articles with the most paragraphs (default 4: Martin_Luther, American_Broadcasting_Company,
Nikola_Tesla, Doctor_Who; 282 train and 71 test paragraphs). It is written as a label,text CSV under --out (not committed: the data
stays in ../shared) and compiled with ``fscompile.compile(teacher, data=..., shots=10)`` and nothing else, the
command a new user runs; the row records the stage timings and the artifact's accuracy. The default teacher
(all-MiniLM-L6-v2) has no classification head, so fscompile fits one on the shots: the accuracy is the whole
pipeline's on a topic task, the time is what this measures.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, Results  # noqa: E402


def write_task(squad: Path, classes: int, out: Path) -> Path:
    """The paragraphs of the ``classes`` largest articles as train.csv (label,text), 80/20 with test.csv."""
    articles = sorted(json.loads(squad.read_text())["data"], key=lambda a: -len(a["paragraphs"]))[:classes]
    rows = [(a["title"], p["context"].replace("\n", " ")) for a in articles for p in a["paragraphs"]]
    random.Random(0).shuffle(rows)
    cut = int(0.8 * len(rows))
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", rows[:cut]), ("test.csv", rows[cut:])):
        with (out / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            w.writerows(part)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="minilm")
    p.add_argument("--squad", default=str(SHARED / "data/squad_v1.1/dev-v1.1.json"))
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--label", default="default", help="names the row (e.g. the code change it measures)")
    p.add_argument("--out", default=str(REPO / "bench-out/long-inputs"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import fscompile
    from fscompile.profile import cpu_info

    out = Path(args.out)
    data = write_task(Path(args.squad), args.classes, out / "data")
    results = Results(out)
    for seed in range(args.seeds):
        t = time.perf_counter()
        m = fscompile.compile(args.teacher, data=str(data), shots=10, seed=seed, out=out / "run", force=True)
        results.record({"label": args.label, "seed": seed, "compile_s": round(time.perf_counter() - t, 1),
                        "timings": m["timings_s"], "accuracy": m["metrics"]["artifact"]["accuracy"],
                        "teacher_accuracy": m["metrics"]["teacher"]["accuracy"],
                        "sources": m["distillation"].get("sources"), "steps": m["distillation"].get("steps"),
                        "best_step": m["distillation"].get("best_step"),
                        "teacher_s": m["distillation"].get("teacher_seconds"),
                        "real_seq_len": m["data"]["real_seq_len"], "cpu": cpu_info()["model"]})


if __name__ == "__main__":
    main()
