"""Image classification through fscompile (issue 6): a teacher trained here, distilled from a few shots.

    python benchmarks/vision.py --dataset cifar10 --epochs 8 --seeds 3 --out bench-out/vision-cifar10
    python benchmarks/vision.py --dataset mnist --epochs 2 --seeds 3 --out bench-out/vision-mnist

Only test splits are stored in ../shared/data, so each is cut in two, per class and seeded: part A
trains the teacher (torchvision resnet18, from scratch, here on the CPU) and is where the shots are
drawn from; part B is never seen by anyone and is the evaluation set. Then, per draw, in one run:
  fscompile      resnet18 teacher -> student (mobilenet_v3_small), KD on augmented views, ORT INT8
  (a) CE on shots the same student architecture trained on the shots alone, no teacher
  (c) teacher    the teacher itself (PyTorch fp32), on part B
Writes results.jsonl, table.md and table.json. Paths default to ../shared (FSCOMPILE_SHARED).
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
SOURCES = {"cifar10": SHARED / "data/cifar10/cifar10_test_jpeg_q75.tar.gz", "mnist": SHARED / "data/mnist"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(SOURCES), default="cifar10")
    p.add_argument("--source", help="override the data file/folder")
    p.add_argument("--teacher-arch", default="resnet18")
    p.add_argument("--student", default="mobilenet_v3_small")
    p.add_argument("--epochs", type=int, default=8, help="teacher training epochs on part A")
    p.add_argument("--teacher-weights", help="reuse a teacher this script trained before (same split)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--out", default=None)
    return p.parse_args()


def split_to_folders(source: Path, root: Path, seed: int = 0) -> list[str]:
    """Part A -> root/train/<class>/, part B -> root/test/<class>/ (half of each class each)."""
    from fscompile.data.images import _class_order, load_image_splits

    splits, _ = load_image_splits(str(source))
    rows = [r for rs in splits.values() for r in rs]
    classes = _class_order({c for _, c in rows})
    rng = np.random.default_rng(seed)
    for c in classes:
        mine = [im for im, k in rows if k == c]
        order = rng.permutation(len(mine))
        for n, i in enumerate(order):
            part = "train" if n < len(mine) // 2 else "test"
            d = root / part / c
            d.mkdir(parents=True, exist_ok=True)
            mine[i].save(d / f"{i:05d}.png")
    return classes


def train_teacher(root: Path, classes: list[str], arch: str, epochs: int, path: Path) -> dict[str, float]:
    """Cross-entropy training on part A with crops and flips (AdamW, cosine), CPU."""
    import torch
    from torchvision.transforms import v2

    from fscompile.data.images import load_image_splits
    from fscompile.models.vision import IMAGENET_MEAN, IMAGENET_STD, build_arch

    torch.manual_seed(0)
    splits, _ = load_image_splits(str(root / "train"))
    rows = splits["all"]
    size = max(32, rows[0][0].size[0])
    x = torch.from_numpy(np.stack([np.asarray(im.resize((size, size))) for im, _ in rows])).permute(0, 3, 1, 2)
    y = torch.tensor([classes.index(c) for _, c in rows])
    aug = v2.Compose([v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    net = build_arch(arch, len(classes))
    steps = epochs * (len(x) // 128)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    t = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,))
        xb = (torch.stack([aug(im) for im in x[idx]]).float() / 255 - mean) / std
        loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"teacher step {step}/{steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    torch.save(net.state_dict(), path)
    return {"teacher_train_s": time.perf_counter() - t, "teacher_steps": steps, "image_size": size}


def ce_on_shots(task, student_arch: str, size: int, seed: int, steps: int = 300) -> float:
    """Baseline (a): the student architecture trained on the shots alone (same augmentations)."""
    import torch

    from fscompile.distill import set_seed
    from fscompile.evaluate import metrics
    from fscompile.models.vision import ImageClassifier, ImageModel, build_arch
    from fscompile.tasks.vision import (
        Augmenter,
        predict_images,
        recalibrate_batchnorm,
        to_uint8,
        torch_image_runner,
        variants,
    )

    set_seed(seed)
    model = ImageModel(ImageClassifier(build_arch(student_arch, task.num_labels)), student_arch, task.label_names,
                       "baseline", size)
    shots = to_uint8(model, [e.image for e in task.shots])
    labels = torch.tensor([e.label for e in task.shots])
    aug = Augmenter(model, task.num_labels, seed, mix=0.0)
    opt = torch.optim.AdamW(model.module.parameters(), lr=1e-3, weight_decay=0.05)
    model.module.train()
    for _ in range(steps):
        idx = torch.randint(0, len(shots), (32,))
        loss = torch.nn.functional.cross_entropy(model.module(aug(shots[idx], labels[idx])).logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_batchnorm(model, variants(model, task, 512, seed + 3))
    model.module.eval()
    logits = predict_images(torch_image_runner(model), model, task.eval)
    return metrics(logits, np.array([e.label for e in task.eval]))["accuracy"]


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    import fscompile
    from fscompile.data.images import load_image_task

    out = Path(args.out or REPO / f"bench-out/vision-{args.dataset}")
    results = Results(out)
    rows, record = results.rows, results.record

    with tempfile.TemporaryDirectory(prefix="fscompile-vision-") as tmp:
        root = Path(tmp) / args.dataset
        classes = split_to_folders(Path(args.source or SOURCES[args.dataset]), root)
        weights = Path(tmp) / "teacher.pt"
        if args.teacher_weights:
            import shutil

            shutil.copy(args.teacher_weights, weights)
            info = {"teacher_steps": f"{args.epochs} epochs (reused)", "image_size": 32}  # train_teacher: at least 32 px
        else:
            info = train_teacher(root, classes, args.teacher_arch, args.epochs, weights)
            shutil_copy = out / f"teacher-{args.teacher_arch}.pt"
            shutil_copy.write_bytes(weights.read_bytes())  # kept for reruns (--teacher-weights)
        for seed in range(args.seeds):
            t = time.perf_counter()
            m = fscompile.compile(args.teacher_arch, weights=str(weights), data=str(root), shots=args.shots, seed=seed,
                                  student=args.student, steps=args.steps, max_eval=args.max_eval,
                                  out=Path(tmp) / "run", force=True)
            base = {"dataset": args.dataset, "shots": args.shots, "seed": seed, **info}
            met = m["metrics"]
            record({**base, "method": "(c) teacher", "accuracy": met["teacher"]["accuracy"],
                    "size_mb": m["size_mb"]["teacher"], "b1_ms": m["profile"]["teacher"]["batch1"]["p50_ms"]})
            record({**base, "method": f"fscompile {args.student} INT8", "accuracy": met["artifact"]["accuracy"],
                    "student_accuracy": met["student"]["accuracy"], "agreement": met["artifact"]["agreement"],
                    "size_mb": m["size_mb"]["artifact"], "b1_ms": m["profile"]["artifact"]["batch1"]["p50_ms"],
                    "variant": m["artifact"].get("variant"), "compile_s": time.perf_counter() - t,
                    "timings": m["timings_s"]})
            task = load_image_task(str(root), args.shots, seed, args.max_eval)
            record({**base, "method": f"(a) {args.student} CE on shots", "accuracy":
                    ce_on_shots(task, args.student, info["image_size"], seed)})
    cells: dict[str, list[dict]] = {}
    for r in rows:
        cells.setdefault(r["method"], []).append(r)
    teacher = np.mean([r["accuracy"] for r in cells.get("(c) teacher", [])])
    lines = [f"{args.dataset}: teacher {args.teacher_arch} trained here on part A ({info['teacher_steps']} steps), "
             f"{args.shots} shots per class from part A, evaluated on part B; seeds 0-{args.seeds - 1}.", "",
             "| method | accuracy (mean ± std) | % of teacher | MB | b1 p50 ms |", "|---|---|---|---|---|"]
    table = []
    for method, rs in cells.items():
        acc = [r["accuracy"] for r in rs]
        mb = np.mean([r["size_mb"] for r in rs]) if "size_mb" in rs[0] else float("nan")
        ms = np.mean([r["b1_ms"] for r in rs]) if "b1_ms" in rs[0] else float("nan")
        table.append({"method": method, "mean": float(np.mean(acc)), "std": float(np.std(acc)), "n": len(acc),
                      "size_mb": mb, "b1_ms": ms})
        lines.append(f"| {method} | {np.mean(acc):.4f} ± {np.std(acc):.4f} (n={len(acc)}) | "
                     f"{np.mean(acc) / teacher:.1%} | {mb:.1f} | {ms:.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
