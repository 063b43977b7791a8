"""Image classification: few-shot distillation of a torchvision teacher into a smaller one.

The transfer set is the shots under torchvision's transforms v2 (random resized crop, flip,
rotation, colour jitter, and MixUp/CutMix between shots), drawn fresh every step: images are
cheap to augment and the teacher labels each variant on the fly.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..calibration import CalibrationSet, from_views
from ..config import CompileConfig, DistillConfig
from ..data.images import ImageTaskData
from ..distill import BestCheckpoint, DistillStats, kd_loss, set_seed
from ..evaluate import held_out_temperature, linear_head, metrics, softened
from ..models.vision import ImageModel, final_linear
from .base import Distilled, Progress, prepare, recovered, timed

# Students from random weights need it (a text-fine-tuning rate would barely move them), and so do
# those that start from the teacher's blocks: on a ResNet-56 -> 26 probe, 1e-4 / 3e-4 / 1e-3 / 3e-3
# kept 0.619 / 0.655 / 0.672 / 0.642.
VISION_LR = 1e-3
# Stage-output matching beside logit KD, for students that kept the teacher's stages. ResNet-56 -> 26,
# 500 steps, draw 0: weight 0 / 1 / 3 / 10 / 30 / 100 kept 0.672 / 0.690 / 0.703 / 0.721 / 0.725 / 0.727.
STAGE_WEIGHT = 30.0


def stage_pairs(teacher: ImageModel, student: ImageModel) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(teacher module, student module) whose outputs the student learns to match: each stage of a
    CIFAR ResNet that kept the teacher's stages with fewer blocks (same shapes), none otherwise.
    A stage's whole feature map is a far denser signal than 10 logits when there are 100 images."""
    from ..models.cifar_resnet import CifarResNet, stages

    t, s = teacher.module.net, student.module.net
    if isinstance(t, CifarResNet) and isinstance(s, CifarResNet) and student.info.get("layer_selection"):
        return list(zip(stages(t), stages(s)))
    return []


class Outputs:
    """Forward hooks that keep the last output of each module (removed on ``close``)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.values: list[torch.Tensor | None] = [None] * len(modules)
        self.hooks = [m.register_forward_hook(self._keep(i)) for i, m in enumerate(modules)]

    def _keep(self, i: int):
        def hook(module, inputs, output):
            self.values[i] = output
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def stage_loss(s: list[torch.Tensor], t: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared error per stage, relative to the teacher's feature energy (stages weigh alike)."""
    return sum(torch.nn.functional.mse_loss(a, b) / b.pow(2).mean().clamp_min(1e-6) for a, b in zip(s, t))


def to_uint8(model: ImageModel, images: list[Any]) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, S, S] at the model's input size (augmentation works on these)."""
    from PIL import Image

    s = model.image_size
    arr = np.stack([np.asarray(im.convert("RGB").resize((s, s), Image.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class Augmenter:
    """Seeded transforms v2 pipeline: one random view per image, and mixing across images.
    ``strong`` puts TrivialAugment in front: more varied inputs for a student that starts from the
    teacher's weights (ResNet-56 -> 26, 500 steps: 0.725 -> 0.734), too hard for one that starts
    from scratch (mobilenet_v3_small: 0.231 -> 0.192)."""

    def __init__(self, model: ImageModel, num_classes: int, seed: int, mix: float = 0.5, strong: bool = False) -> None:
        from torchvision.transforms import v2

        s = model.image_size
        self.view = v2.Compose([*([v2.TrivialAugmentWide()] if strong else []),
                                v2.RandomResizedCrop(s, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                                v2.RandomApply([v2.RandomRotation(15)], p=0.3),
                                v2.ColorJitter(0.3, 0.3, 0.3, 0.05)])
        self.mixer = v2.RandomChoice([v2.MixUp(num_classes=num_classes), v2.CutMix(num_classes=num_classes)])
        self.mix = mix
        self.mean = torch.tensor(model.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model.std).view(1, 3, 1, 1)
        self.gen = torch.Generator().manual_seed(seed)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # v2 draws its parameters from torch's global generator: fork it to stay seeded here
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
            views = torch.stack([self.view(im) for im in images])
            if len(views) > 1 and torch.rand(1).item() < self.mix:
                views = self.mixer(views.float(), labels)[0]  # the teacher labels the mixture itself
        return self.normalise(views)


def variants(model: ImageModel, task: ImageTaskData, n: int, seed: int) -> torch.Tensor:
    """``n`` fixed augmented views of the shots (normalised): for calibration and validation."""
    shots = to_uint8(model, [e.image for e in task.shots])
    labels = torch.tensor([e.label for e in task.shots])
    aug = Augmenter(model, task.num_labels, seed)
    rng = np.random.default_rng(seed)
    out = [aug.normalise(shots)]
    while sum(len(o) for o in out) < n:
        idx = torch.from_numpy(rng.choice(len(shots), size=min(32, len(shots)), replace=False))
        out.append(aug(shots[idx], labels[idx]))
    return torch.cat(out)[:n]


def features(model: ImageModel, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Inputs of the classifier's last linear layer (the penultimate features)."""
    _, _, layer = final_linear(model.module.net)
    feats: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model.module(x[i:i + batch])
    finally:
        hook.remove()
    return torch.cat(feats)


def fit_image_head(teacher: ImageModel, task: ImageTaskData, seed: int, views: int = 20) -> dict[str, Any]:
    """A teacher trained on other classes (ImageNet weights) gets its final layer replaced by a
    logistic regression fitted on the shots' features (several augmented views of each)."""
    from sklearn.linear_model import LogisticRegression

    shots = to_uint8(teacher, [e.image for e in task.shots])
    labels = np.array([e.label for e in task.shots])
    aug = Augmenter(teacher, task.num_labels, seed, mix=0.0)
    xs = [aug.normalise(shots)] + [aug(shots, torch.from_numpy(labels)) for _ in range(views - 1)]
    f = features(teacher, torch.cat(xs)).numpy()
    y = np.tile(labels, views)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(f, y)
    # as the text head (fscompile.adapt.fit_head): regularised probabilities need a temperature for the
    # label-free retention estimate, fitted on held-out shots (all their views out), scored on their clean view
    temperature = None
    per_class = int(np.bincount(labels).min())
    if per_class >= 2:
        from sklearn.model_selection import StratifiedGroupKFold

        folds = StratifiedGroupKFold(min(5, per_class), shuffle=True, random_state=seed)
        temperature = held_out_temperature(LogisticRegression(max_iter=2000, C=1.0), f, y, folds,
                                           groups=np.tile(np.arange(len(labels)), views), rows=slice(len(labels)))
    parent, attr, old = final_linear(teacher.module.net)
    head = torch.nn.Linear(old.in_features, task.num_labels)
    w, b = linear_head(clf)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w).float())
        head.bias.copy_(torch.from_numpy(b).float())
    setattr(parent, attr, head)
    teacher.label_names, teacher.has_head = list(task.label_names), True
    return {"method": "logistic regression on penultimate features", "views_per_shot": views,
            "train_accuracy": float(clf.score(f, y)), "temperature": temperature}


def recalibrate_batchnorm(model: ImageModel, x: torch.Tensor, batch: int = 64) -> None:
    """Re-estimate BatchNorm statistics on ``x`` (an exact average, not a running one).
    Students start from scratch and train a few hundred steps: with torchvision's momentum
    (0.01 in MobileNetV3) the running statistics would still be the initial ones."""
    bns = [m for m in model.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    was_training = model.module.training
    model.module.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model.module(x[i:i + batch])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.module.train(was_training)


def _agreement(student: ImageModel, x: torch.Tensor, t_logits: torch.Tensor) -> float:
    with torch.no_grad():
        s = torch.cat([student.module(x[i:i + 128]).logits for i in range(0, len(x), 128)])
    return float((s.argmax(-1) == t_logits.argmax(-1)).float().mean())


def distill_images(teacher: ImageModel, student: ImageModel, task: ImageTaskData, cfg: DistillConfig, seed: int,
                   progress: Callable[[int, int, float], None] | None = None,
                   validation: torch.Tensor | None = None) -> DistillStats:
    """KD on the teacher's logits (and its stage outputs, see :func:`stage_pairs`) over fresh
    augmented views each step; with ``validation``
    (views never trained on) the checkpoint that agrees best with the teacher is kept."""
    cfg = cfg.resolved()
    start = time.perf_counter()
    set_seed(seed)
    shots = to_uint8(student, [e.image for e in task.shots])
    labels = torch.tensor([e.label for e in task.shots])
    aug = Augmenter(student, task.num_labels, seed, strong=student.info.get("init") == "teacher")
    lr = cfg.lr if cfg.lr is not None else VISION_LR
    model = student.module
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    v_logits = None
    if validation is not None:
        with torch.no_grad():
            v_logits = torch.cat([teacher.module(validation[i:i + 128]).logits for i in range(0, len(validation), 128)])
    eval_at = {round(cfg.steps * (k + 1) / cfg.evals) for k in range(cfg.evals)} if v_logits is not None else set()
    gen = np.random.default_rng(seed)
    bn_views = variants(student, task, 512, seed + 3)  # training-distribution views for BatchNorm statistics
    teacher.module.eval()
    ema, total, best = math.nan, {"kd": 0.0, "stages": 0.0}, BestCheckpoint(cfg.steps)
    pairs = stage_pairs(teacher, student)
    t_out, s_out = Outputs([p[0] for p in pairs]), Outputs([p[1] for p in pairs])
    batch = max(cfg.batch_size, 32)  # CNN students need larger batches than text fine-tuning (BatchNorm)
    model.train()
    try:
        for step in range(cfg.steps):
            idx = torch.from_numpy(gen.choice(len(shots), size=batch, replace=len(shots) < batch))
            x = aug(shots[idx], labels[idx])
            with torch.no_grad():
                t = teacher.module(x).logits
            kd = kd_loss(model(x).logits, t, cfg.temperature)
            feat = stage_loss(s_out.values, t_out.values) if pairs else torch.zeros(())
            loss = kd + STAGE_WEIGHT * feat
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total["kd"] += kd.item()
            total["stages"] += feat.item()
            ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
            if step + 1 in eval_at:
                recalibrate_batchnorm(student, bn_views)
                model.eval()
                agree = _agreement(student, validation, v_logits)
                model.train()
                best.check(step + 1, agree, model, agreement=agree)
            if progress:
                progress(step + 1, cfg.steps, ema)
    finally:
        t_out.close()
        s_out.close()
    if not best.restore(model):
        recalibrate_batchnorm(student, bn_views)
    model.eval()
    return DistillStats(steps=cfg.steps, transfer_size=len(shots), seconds=time.perf_counter() - start,
                        final_loss=ema, losses={k: v / cfg.steps for k, v in total.items() if v}, best_step=best.step,
                        validation=best.curve, lr=lr)


def predict_images(runner: Callable[[dict[str, np.ndarray]], np.ndarray], model: ImageModel,
                   examples: list[Any], batch: int = 64) -> np.ndarray:
    out = [np.asarray(runner({"pixel_values": model.preprocess([e.image for e in examples[i:i + batch]])}))
           for i in range(0, len(examples), batch)]
    return np.concatenate(out).astype(np.float32)


def torch_image_runner(model: ImageModel):
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model.module(torch.from_numpy(batch["pixel_values"])).logits.float().numpy()
    return run


def evaluate_images(task: ImageTaskData, teacher: ImageModel, student: ImageModel, artifact_runner,
                    temperature: float | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, agreement with the teacher and estimated retention on the evaluation images."""
    labels = np.array([e.label for e in task.eval])
    t_logits = predict_images(torch_image_runner(teacher), teacher, task.eval)
    p = softened(t_logits, temperature)
    return {"teacher": metrics(t_logits, labels, t_logits, p),
            "student": metrics(predict_images(torch_image_runner(student), student, task.eval), labels, t_logits, p),
            "artifact": metrics(predict_images(artifact_runner, student, task.eval), labels, t_logits, p)}


class ImageClassificationTask:
    """The image-classification adapter."""

    name = "image-classification"

    def distill_stage(self, cfg: CompileConfig, backend: Any, progress: Any):
        from ..checkpoint import checkpoint_dir, resume_or_distill
        from ..data.images import load_image_task
        from ..errors import InputError
        from ..models.vision import derive_image_student, load_image_teacher

        if cfg.embedding_bits != 8 or cfg.embedding_rank or cfg.distill.unlabeled:
            raise InputError("--embedding-bits, --embedding-rank and --unlabeled apply to text models only")
        timings: dict[str, float] = {}
        set_seed(cfg.seed)
        with timed(timings, "load data", progress):
            task = load_image_task(cfg.data, cfg.shots, cfg.seed, cfg.max_eval)
        with timed(timings, "load teacher", progress):
            size = cfg.image_size or native_size(task)
            teacher = load_image_teacher(cfg.teacher, task.label_names, size, cfg.weights)
            if cfg.image_size:
                teacher.image_size = cfg.image_size
            teacher.mean, teacher.std = tuple(cfg.mean or teacher.mean), tuple(cfg.std or teacher.std)
        with timed(timings, "adapt teacher", progress):
            adaptation = None if teacher.has_head else fit_image_head(teacher, task, cfg.seed)
        with timed(timings, "derive student", progress):
            student, unpruned = prepare(derive_image_student(teacher, cfg.student), backend, cfg)
        ckpt = checkpoint_dir(cfg, backend)
        with timed(timings, "distill", progress):
            student, stats = resume_or_distill(ckpt, student, progress, lambda: distill_images(
                teacher, student, task, cfg.distill, cfg.seed,
                progress=lambda d, t, loss: progress("distill", d, t, f"loss {loss:.4f}"),
                validation=variants(teacher, task, 256, cfg.seed + 7919) if cfg.distill.evals else None))
        return Distilled(task, teacher, student, [], None, stats, adaptation, unpruned, timings, ckpt)

    def retarget(self, d: Distilled, backend: Any, cfg: CompileConfig, steps: int, progress: Progress) -> Distilled:
        return recovered(d, backend, cfg, steps, progress,
                         lambda student, dcfg: distill_images(d.teacher, student, d.task, dcfg, cfg.seed))

    def calibration(self, d: Any, cfg: CompileConfig) -> CalibrationSet:
        """Shots plus augmented views calibrate; views of another seed validate."""
        return from_views(lambda n, seed: variants(d.student, d.task, n, seed).numpy(), cfg.seed)

    def evaluate(self, d: Any, runner: Any, cfg: CompileConfig) -> dict[str, Any]:
        return evaluate_images(d.task, d.teacher, d.student, runner, d.teacher_temperature)

    def input_size(self, d: Any, cfg: CompileConfig) -> tuple[int, int, int | None]:
        return 0, d.student.image_size, None

    def predictions(self, d: Any, runner: Any, model: ImageModel) -> np.ndarray:
        """``model``'s logits on the evaluation images, through ``runner`` (None: in PyTorch)."""
        return predict_images(runner or torch_image_runner(model), model, d.task.eval)

    def score(self, d: Any, preds: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        return metrics(preds, np.array([e.label for e in d.task.eval]), reference,
                       softened(reference, d.teacher_temperature))


def native_size(task: ImageTaskData) -> int:
    """The data's own image side (median of the shots' longer sides), at least 32 pixels."""
    return max(32, int(np.median([max(e.image.size) for e in task.shots])))
