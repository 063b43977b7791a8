"""Image-classification models: torchvision teachers and students, preprocessing, export."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, StageError
from .text import Output, shrink_to

VISION_FILE = "fscompile_vision.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STUDENTS = ("mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2", "resnet18", "shufflenet_v2_x0_5",
            "squeezenet1_1", "efficientnet_b0")


class ImageClassifier(nn.Module):
    """A torchvision classifier behind the interface the distiller and exporter use:
    ``forward(pixel_values) -> Output(logits)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> Output:
        return Output(self.net(pixel_values))


@dataclass
class ImageModel:
    """A classifier module with its architecture name, input size and normalisation."""

    module: ImageClassifier
    arch: str
    label_names: list[str]
    source: str
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    has_head: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=lambda: ["pixel_values"])
    fusion: str | None = None  # ORT's transformer optimizer has nothing to fuse in a CNN
    quant_ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")

    @property
    def config(self) -> None:
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def preprocess(self, images: list[Any]) -> np.ndarray:
        """PIL images -> float32 [N, 3, S, S]: resize, scale to [0, 1], normalise."""
        from PIL import Image

        s = self.image_size
        arr = np.stack([np.asarray(im.convert("RGB").resize((s, s), Image.BILINEAR), dtype=np.float32)
                        for im in images]) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))

    def export_onnx(self, path: Path, opset: int = 17) -> None:
        """One-file ONNX, input ``pixel_values`` [batch, 3, S, S], output ``logits``."""

        class _Logits(nn.Module):
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, pixel_values):
                return self.inner(pixel_values).logits

        dummy = torch.zeros(2, 3, self.image_size, self.image_size)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_Logits(self.module).eval(), (dummy,), str(path), input_names=["pixel_values"],
                                  output_names=["logits"], opset_version=opset, dynamo=False,
                                  dynamic_axes={"pixel_values": {0: "batch_size"}, "logits": {0: "batch_size"}})
        except Exception as e:  # exporter failures are many types; surface one line
            raise StageError(f"ONNX export failed: {str(e).splitlines()[0][:200]}") from e

    def save_pretrained(self, out: Path) -> None:
        """config.json (labels, architecture) and a Hugging Face preprocessor_config.json, so an
        edge pipeline knows how to feed the ONNX model."""
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"architectures": [self.arch], "model_type": "torchvision", "num_labels": len(self.label_names),
               "id2label": {str(i): n for i, n in enumerate(self.label_names)},
               "label2id": {n: i for i, n in enumerate(self.label_names)}, "image_size": self.image_size}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
               "size": {"height": self.image_size, "width": self.image_size}, "resample": 2,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": list(self.mean), "image_std": list(self.std)}
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

    def save_torch(self, out: Path) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self.module.net.state_dict().items()}
        save_file(state, out / "model.safetensors")
        meta = {"arch": self.arch, "labels": self.label_names, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std)}
        (out / VISION_FILE).write_text(json.dumps(meta))

    def prune(self, rate: float, heads: bool = True) -> dict[str, Any]:
        """Structured channel pruning at ``rate`` with Torch-Pruning's dependency graph (coupled
        convolutions, BatchNorms, residual adds and depthwise groups shrink together), L2
        magnitude importance, widths rounded to multiples of 8 for SIMD kernels; the classifier's
        outputs are kept. The pruned convolutions really shrink."""
        if rate <= 0:
            return {}
        import torch_pruning as tp

        net = self.module.net
        before = sum(p.numel() for p in net.parameters())
        head = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == len(self.label_names)]
        example = torch.zeros(1, 3, self.image_size, self.image_size)
        try:
            tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=rate, ignored_layers=head, round_to=8).step()
        except Exception as e:  # an architecture the dependency graph cannot trace: say so in one line
            raise StageError(f"channel pruning failed on {self.arch}: {str(e).splitlines()[0][:200]}") from e
        return {"pattern": "structured-channels", "rate": rate, "parameters_before": before,
                "parameters_after": sum(p.numel() for p in net.parameters())}


def build_arch(arch: str, num_classes: int) -> nn.Module:
    """A torchvision architecture by name, randomly initialised, with ``num_classes`` outputs."""
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
        raise InputError(f"unknown torchvision architecture {arch!r}; known: {known}") from None


def _classifier_out(state: dict[str, torch.Tensor]) -> int:
    """Classes of a torchvision state dict: rows of its last 2-D weight."""
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not last:
        raise InputError("the weights have no final linear layer to read the class count from")
    return int(last[-1].shape[0])


def is_vision_teacher(spec: str, weights: str | None = None) -> bool:
    """A torchvision architecture name, or a directory a previous image run wrote."""
    if weights or (Path(spec) / VISION_FILE).is_file():
        return True
    try:
        import torchvision

        return spec in torchvision.models.list_models(module=torchvision.models)
    except ImportError:
        return False


def load_image_model(path: Path) -> ImageModel:
    """A model written by :meth:`ImageModel.save_torch` (safetensors, no pickle)."""
    from safetensors.torch import load_file

    meta = json.loads((path / VISION_FILE).read_text())
    net = build_arch(meta["arch"], len(meta["labels"]))
    state = load_file(path / "model.safetensors")
    shrink_to(net, state)  # channel-pruned weights: give the modules their saved widths
    net.load_state_dict(state, strict=True)
    return ImageModel(ImageClassifier(net).eval(), meta["arch"], meta["labels"], str(path), meta["image_size"],
                      tuple(meta["mean"]), tuple(meta["std"]))


def load_image_teacher(spec: str, label_names: list[str], image_size: int, weights: str | None = None) -> ImageModel:
    """``spec``: a directory from a previous run, or an architecture name with ``weights``
    (a state dict, loaded with ``weights_only=True``) or torchvision's default weights (Hub).
    A teacher whose class count differs from the data's gets ``has_head=False``: its final
    layer is refitted on the shots."""
    p = Path(spec).expanduser()
    if (p / VISION_FILE).is_file():
        model = load_image_model(p)
    else:
        if weights:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle errors, missing files, not a state dict: one line
                raise InputError(f"cannot load --weights {weights}: {str(e).splitlines()[0][:200]}") from None
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise InputError(f"--weights {weights} is not a state dict")
            net = build_arch(spec, _classifier_out(state))
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise InputError(f"--weights {weights} do not fit {spec}: {str(e).splitlines()[0][:200]}") from None
            source = f"{spec} + {weights}"
        else:
            import torchvision

            try:
                net = torchvision.models.get_model(spec, weights="DEFAULT")
            except Exception as e:  # download failures are many types
                raise InputError(f"cannot load torchvision weights for {spec!r} ({str(e).splitlines()[0][:160]}); "
                                 "pass --weights FILE for a local state dict") from None
            source = f"torchvision:{spec}:DEFAULT"
        n = _classifier_out(net.state_dict())
        names = label_names if n == len(label_names) else [str(i) for i in range(n)]
        model = ImageModel(ImageClassifier(net).eval(), spec, names, source, image_size)
    if len(model.label_names) != len(label_names):
        model.has_head = False
    elif model.label_names != label_names and all(n.isdecimal() for n in model.label_names):
        model.label_names = list(label_names)  # index-named classes take the data's names
    model.module.eval()
    return model


def final_linear(net: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute, layer) of the classifier's last Linear."""
    last = None
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise InputError("the teacher has no final linear layer to refit")
    parent_name, _, attr = last.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    return parent, attr, getattr(parent, attr)


def derive_image_student(teacher: ImageModel, arch: str | None) -> ImageModel:
    """The student: ``arch`` from torchvision (random init), default mobilenet_v3_small; the
    teacher's own architecture starts from the teacher's weights."""
    import copy

    arch = arch or "mobilenet_v3_small"
    if arch == teacher.arch:
        net = copy.deepcopy(teacher.module.net)
    else:
        net = build_arch(arch, len(teacher.label_names))
    return ImageModel(ImageClassifier(net), arch, list(teacher.label_names), f"student:{arch}", teacher.image_size,
                      teacher.mean, teacher.std)
