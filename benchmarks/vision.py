"""Image classification through fscompile: a pretrained or trained-here teacher, distilled from a few shots.

    python benchmarks/vision.py --dataset cifar10 --teacher-arch cifar_resnet56 \
        --teacher-weights ../shared/teachers/cifar10-resnet/resnet56-4bfd9763.th \
        --students default,mobilenet_v3_small --seeds 3 --out bench-out/vision-cifar10-resnet56
    python benchmarks/vision.py --dataset mnist --epochs 15 --seeds 3 --out bench-out/vision-mnist

Only test splits are stored in ../shared/data, so each is cut in two, per class and seeded: part A
is where the shots are drawn from (and, without --teacher-weights, trains the teacher: torchvision
resnet18 from scratch, here on the CPU); part B is never seen by anyone and is the evaluation set.
Then, per draw, in one run:
  fscompile      teacher -> each student of --students ("default": what fscompile derives, e.g. a
                 CIFAR ResNet with half its blocks), KD on augmented views, ORT INT8
  (a) CE on shots the same student, from the same start, trained on the shots alone, no teacher
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
    p.add_argument("--students", default="default",
                   help="comma-separated students: 'default' (fscompile's choice) or architecture names")
    p.add_argument("--epochs", type=int, default=8, help="teacher training epochs on part A")
    p.add_argument("--teacher-weights", help="a pretrained teacher, or one this script trained before (no training)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: fscompile's)")
    p.add_argument("--lr", type=float, default=None, help="distillation learning rate (default: fscompile's)")
    p.add_argument("--prune", type=float, default=None, help="pruning rate (default: fscompile's)")
    p.add_argument("--no-baseline", action="store_true", help="skip (a), training on the shots alone")
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


def ce_on_shots(task, teacher, student: str | None, seed: int, steps: int = 300) -> float:
    """Baseline (a): the student fscompile would start from (``student``: None for its default),
    trained on the shots alone with the same augmentations, at fscompile's learning rate."""
    import torch

    from fscompile.distill import set_seed
    from fscompile.evaluate import metrics
    from fscompile.models.vision import derive_image_student
    from fscompile.tasks.vision import (
        VISION_LR,
        Augmenter,
        predict_images,
        recalibrate_batchnorm,
        to_uint8,
        torch_image_runner,
        variants,
    )

    set_seed(seed)
    model = derive_image_student(teacher, student)
    shots = to_uint8(model, [e.image for e in task.shots])
    labels = torch.tensor([e.label for e in task.shots])
    aug = Augmenter(model, task.num_labels, seed, mix=0.0)
    opt = torch.optim.AdamW(model.module.parameters(), lr=VISION_LR, weight_decay=0.05)
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
    from fscompile.models.vision import load_image_teacher

    out = Path(args.out or REPO / f"bench-out/vision-{args.dataset}")
    results = Results(out)
    rows, record = results.rows, results.record

    with tempfile.TemporaryDirectory(prefix="fscompile-vision-") as tmp:
        root = Path(tmp) / args.dataset
        classes = split_to_folders(Path(args.source or SOURCES[args.dataset]), root)
        weights = Path(tmp) / "teacher.pt"
        if args.teacher_weights:
            weights = Path(args.teacher_weights).resolve()
            info = {"teacher": f"{args.teacher_arch} {weights.name} (not trained here)", "image_size": 32}
        else:
            info = train_teacher(root, classes, args.teacher_arch, args.epochs, weights)
            shutil_copy = out / f"teacher-{args.teacher_arch}.pt"
            shutil_copy.write_bytes(weights.read_bytes())  # kept for reruns (--teacher-weights)
        extra = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("prune", args.prune)) if v is not None}
        tag = "".join(f" {k}={v:g}" for k, v in extra.items())
        teacher = load_image_teacher(args.teacher_arch, classes, info["image_size"], str(weights))
        for seed in range(args.seeds):
            task = load_image_task(str(root), args.shots, seed, args.max_eval)
            base = {"dataset": args.dataset, "shots": args.shots, "seed": seed, **info}
            for i, name in enumerate(args.students.split(",")):
                student = None if name == "default" else name
                t = time.perf_counter()
                m = fscompile.compile(args.teacher_arch, weights=str(weights), data=str(root), shots=args.shots,
                                      seed=seed, student=student, max_eval=args.max_eval, out=Path(tmp) / "run",
                                      force=True, **extra)
                met, arch = m["metrics"], m["student"]["architecture"]
                if i == 0:
                    record({**base, "method": "(c) teacher", "accuracy": met["teacher"]["accuracy"],
                            "size_mb": m["size_mb"]["teacher"], "b1_ms": m["profile"]["teacher"]["batch1"]["p50_ms"]})
                record({**base, "method": f"fscompile {arch} INT8{tag}", "accuracy": met["artifact"]["accuracy"],
                        "student_accuracy": met["student"]["accuracy"], "agreement": met["artifact"]["agreement"],
                        "size_mb": m["size_mb"]["artifact"], "b1_ms": m["profile"]["artifact"]["batch1"]["p50_ms"],
                        "variant": m["artifact"].get("variant"), "compile_s": time.perf_counter() - t,
                        "best_step": m["distillation"]["best_step"], "layer_selection": m["student"]["layer_selection"],
                        "timings": m["timings_s"]})
                if not args.no_baseline:
                    record({**base, "method": f"(a) {arch} CE on shots",
                            "accuracy": ce_on_shots(task, teacher, student, seed)})
    cells: dict[str, list[dict]] = {}
    for r in rows:
        cells.setdefault(r["method"], []).append(r)
    teacher = np.mean([r["accuracy"] for r in cells.get("(c) teacher", [])])
    about = info.get("teacher") or f"{args.teacher_arch} trained here on part A ({info['teacher_steps']} steps)"
    lines = [f"{args.dataset}: teacher {about}, "
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
