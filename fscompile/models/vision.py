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
from .cifar_resnet import (
    CifarResNet,
    arch_name,
    drop_blocks,
    parse_blocks,
    residual_stream,
)
from .cifar_resnet import build as build_cifar
from .text import Output, shrink_to

VISION_FILE = "fscompile_vision.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STUDENTS = ("mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2", "resnet18", "shufflenet_v2_x0_5",
            "squeezenet1_1", "efficientnet_b0")


IN_MEMORY: dict[str, nn.Module] = {}  # teachers handed over as objects: fscompile.compile(teacher=net)


class ImageClassifier(nn.Module):
    """An image classifier (torchvision, CIFAR ResNet, a user's module, a transformers image model)
    behind the interface the distiller and exporter use: ``forward(pixel_values) -> Output(logits)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> Output:
        out = self.net(pixel_values)
        return Output(getattr(out, "logits", out))  # transformers models return an output object


class ExportedClassifier(ImageClassifier):
    """A ``torch.export`` program of a user's module (what :meth:`ImageModel.save_torch` writes
    for architectures fscompile cannot rebuild by name). Exported graphs are fixed in eval mode."""

    def train(self, mode: bool = True) -> ExportedClassifier:
        self.training = mode  # torch.export's modules refuse train()/eval(); their BatchNorms are frozen
        return self


class _Logits(nn.Module):
    """An :class:`ImageClassifier` with its logits as a plain tensor: what the exporters take
    (ONNX wants tensors; a ``torch.export`` program that returned a transformers output class
    would need that library to load again)."""

    def __init__(self, inner: ImageClassifier) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values).logits


def register_module(net: nn.Module) -> str:
    """The name under which the pipeline finds a module handed over as an object: its class and
    a digest of its weights (so checkpoints and fingerprints tell two modules apart)."""
    from .base import module_sha256

    spec = f"module:{type(net).__name__}-{module_sha256(net)[:12]}"
    IN_MEMORY[spec] = net
    return spec


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
    custom: bool = False  # a user's architecture: saved with torch.export, not rebuilt by name
    info: dict[str, Any] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=lambda: ["pixel_values"])
    fusion: str | None = None  # ORT's transformer optimizer has nothing to fuse in a CNN
    quant_ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    static_qdq: bool = True  # ort-int8 also tries static QDQ calibrated on the shots
    weight_only_int4: bool = False

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
        family = "cifar_resnet" if parse_blocks(self.arch) else "torchvision"
        cfg = {"architectures": [self.arch], "model_type": family, "num_labels": len(self.label_names),
               "id2label": {str(i): n for i, n in enumerate(self.label_names)},
               "label2id": {n: i for i, n in enumerate(self.label_names)}, "image_size": self.image_size}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
               "size": {"height": self.image_size, "width": self.image_size}, "resample": 2,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": list(self.mean), "image_std": list(self.std)}
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

    def save_torch(self, out: Path) -> None:
        """safetensors (rebuilt by architecture name), or for a user's own architecture a
        ``torch.export`` program, which a fresh process (profiling) loads without its code."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        meta = {"arch": self.arch, "labels": self.label_names, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std)}
        if self.custom:
            was = self.module.training
            self.module.eval()
            try:
                x = torch.zeros(2, 3, self.image_size, self.image_size)
                prog = torch.export.export(_Logits(ImageClassifier(self.module.net)), (x,),
                                           dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
            except Exception as e:  # what torch.export cannot trace: one line
                raise StageError(f"torch.export of {self.arch} failed: {str(e).splitlines()[0][:200]}") from e
            finally:
                self.module.train(was)
            torch.export.save(prog, out / "model.pt2")
            (out / VISION_FILE).write_text(json.dumps({**meta, "format": "torch.export"}))
            return
        state = {k: v.detach().contiguous().clone() for k, v in self.module.net.state_dict().items()}
        save_file(state, out / "model.safetensors")
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
        keep = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == len(self.label_names)]
        if isinstance(net, CifarResNet):
            # the zero-padding shortcut is invisible to the dependency graph: prune inside blocks only
            keep += residual_stream(net)
        prunable = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d) and m not in keep]
        # multiples of 8 suit SIMD kernels, but would cut a 16-channel layer in half
        round_to = 8 if prunable and min(prunable) >= 64 else None
        example = torch.zeros(1, 3, self.image_size, self.image_size)
        try:
            tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=rate, ignored_layers=keep, round_to=round_to).step()
        except Exception as e:  # an architecture the dependency graph cannot trace: say so in one line
            raise StageError(f"channel pruning failed on {self.arch}: {str(e).splitlines()[0][:200]}") from e
        return {"pattern": "structured-channels", "rate": rate, "parameters_before": before,
                "parameters_after": sum(p.numel() for p in net.parameters())}


def build_arch(arch: str, num_classes: int) -> nn.Module:
    """A torchvision architecture or a CIFAR ResNet (``cifar_resnet56``) by name, randomly
    initialised, with ``num_classes`` outputs."""
    import torchvision

    if parse_blocks(arch):
        return build_cifar(arch, num_classes)
    if arch.startswith("cifar_resnet"):
        raise InputError(f"{arch}: a CIFAR ResNet's depth is 6n+2 (cifar_resnet20, 32, 44, 56, 110, ...)")
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
        raise InputError(f"unknown image architecture {arch!r}; known: cifar_resnet20 ... cifar_resnet110 "
                         f"(depth 6n+2), {known}") from None


def _classifier_out(state: dict[str, torch.Tensor]) -> int:
    """Classes of a torchvision state dict: rows of its last 2-D weight."""
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not last:
        raise InputError("the weights have no final linear layer to read the class count from")
    return int(last[-1].shape[0])


def is_vision_teacher(spec: str, weights: str | None = None) -> bool:
    """A torchvision or CIFAR ResNet architecture name, a module handed over in Python, or a
    directory a previous image run wrote."""
    if weights or (Path(spec) / VISION_FILE).is_file() or spec.startswith(("cifar_resnet", "module:")):
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
    if meta.get("format") == "torch.export":
        module = ExportedClassifier(torch.export.load(path / "model.pt2").module())
        return ImageModel(module, meta["arch"], meta["labels"], str(path), meta["image_size"], tuple(meta["mean"]),
                          tuple(meta["std"]), custom=True)
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
    if spec in IN_MEMORY:
        import copy

        net = copy.deepcopy(IN_MEMORY[spec]).eval()  # fitting a head must not change the user's module
        try:
            with torch.no_grad():
                n = int(ImageClassifier(net)(torch.zeros(1, 3, image_size, image_size)).logits.shape[-1])
        except Exception as e:  # the module's own errors: one line
            raise InputError(f"the teacher module fails on a 1x3x{image_size}x{image_size} input: "
                             f"{str(e).splitlines()[0][:200]}") from None
        names = label_names if n == len(label_names) else [str(i) for i in range(n)]
        model = ImageModel(ImageClassifier(net), type(net).__name__, names, spec, image_size, custom=True)
    elif spec.startswith("module:"):
        raise InputError(f"{spec} names a module handed to fscompile.compile in another process; pass the module")
    elif (p / VISION_FILE).is_file():
        model = load_image_model(p)
    else:
        if weights:
            state = read_state_dict(weights)
            net = build_arch(spec, _classifier_out(state))
            load_fitting(net, state, f"--weights {weights} do not fit {spec}")
            source = f"{spec} + {weights}"
        elif spec.startswith("cifar_resnet"):
            build_arch(spec, 10)  # a bad depth says so first
            raise InputError(f"{spec} has no built-in weights; pass --weights FILE (a state dict, e.g. "
                             "resnet56-4bfd9763.th of akamaster/pytorch_resnet_cifar10)")
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


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint as real users have them: a state dict, or a dict holding one under
    ``state_dict`` or ``model`` (training scripts' habit), with DataParallel's ``module.``
    prefixes stripped. Always ``weights_only=True``: a pickle that would run code is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, missing files, code-executing payloads: one line
        raise InputError(f"cannot load --weights {path}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"--weights {path} is not a state dict (nor a dict holding one as 'state_dict' or 'model')")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_fitting(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``net.load_state_dict(state)``, strict, failing in one line that names the first key that
    is missing, unexpected or of another shape (torch's own message lists them all)."""
    own = net.state_dict()
    for k, v in own.items():
        if k not in state:
            if k.endswith("num_batches_tracked"):  # absent before PyTorch 0.4.1; BatchNorm fills it in
                continue
            raise InputError(f"{what}: no {k!r} in the checkpoint")
        if tuple(state[k].shape) != tuple(v.shape):
            raise InputError(f"{what}: {k!r} is {tuple(state[k].shape)} in the checkpoint, "
                             f"{tuple(v.shape)} in the model")
    extra = [k for k in state if k not in own]
    if extra:
        raise InputError(f"{what}: the checkpoint has {extra[0]!r}, which the model does not"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    net.load_state_dict(state, strict=True)


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
    """The student. By default a CIFAR ResNet teacher keeps half of its residual blocks, with the
    teacher's weights (:func:`~fscompile.models.cifar_resnet.drop_blocks`); other teachers get
    mobilenet_v3_small.
    A named ``arch`` starts from random weights, except the teacher's own, which starts from it."""
    import copy

    info: dict[str, Any] = {"init": "teacher"}
    if arch is None and isinstance(teacher.module.net, CifarResNet):
        net, info["layer_selection"] = drop_blocks(teacher.module.net)
        arch = arch_name(net)
    else:
        arch = arch or "mobilenet_v3_small"
        if arch == teacher.arch:
            net = copy.deepcopy(teacher.module.net)
        else:
            net, info["init"] = build_arch(arch, len(teacher.label_names)), "random"
    same = arch == teacher.arch  # an exported teacher's copy stays exported (fixed in eval mode)
    wrapper = type(teacher.module) if same else ImageClassifier
    return ImageModel(wrapper(net), arch, list(teacher.label_names), f"student:{arch}", teacher.image_size,
                      teacher.mean, teacher.std, custom=teacher.custom and same, info=info)
