"""TensorRT targets ``trt-int8`` and ``trt-fp16``: 2:4 sparse weights, explicit quantization.

What is built where:
- everywhere: the student with 2:4 semi-structured sparse Linear weights (2 of every 4
  consecutive input weights zero, masks fixed through the recovery distillation), exported to
  ONNX; for ``trt-int8`` as an explicit-quantization QDQ graph (symmetric INT8, per-channel
  weights, calibrated on the shots), which is what TensorRT >= 8 consumes without its own
  calibrator. That graph also runs in ONNX Runtime on a CPU, which is how it is checked here.
- where TensorRT and a CUDA GPU are present (``pip install -e ".[tensorrt]"``): the engine,
  built with ``SPARSE_WEIGHTS`` (+ ``INT8``/``FP16``) and dynamic shapes, and profiled on the GPU.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calibration import CalibrationSet, ReaderFromBatches
from ..errors import StageError, TargetUnavailable
from ..models.text import TextModel
from . import Artifact, Backend, Recipe
from .onnxruntime import MODEL_FILE, OrtRunner

ENGINE_FILE = "model.engine"


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT and a CUDA GPU are usable here, or why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (pip install -e '.[tensorrt]'; its wheels come from NVIDIA's index)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, _ = torch.cuda.get_device_capability(0)
    if major < 8:
        return False, f"2:4 sparse tensor cores need compute capability >= 8.0 (found {major}.x)"
    return True, ""


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive inputs (per output row)."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise StageError(f"2:4 sparsity needs input features divisible by 4, got {in_f}")
    groups = weight.detach().abs().reshape(out_f, in_f // 4, 4)
    top2 = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return mask.reshape(out_f, in_f)


def is_2to4(weight: np.ndarray | torch.Tensor, axis_in: int = 1) -> bool:
    """True when every group of 4 consecutive inputs holds at most 2 non-zeros."""
    w = np.asarray(weight)
    if axis_in == 0:
        w = w.T
    if w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def apply_2to4(student: TextModel) -> dict[str, Any]:
    """Prune every Linear in the encoder layers to 2:4 and register the masks, so the
    recovery distillation keeps them fixed."""
    masks: dict[str, torch.Tensor] = student.info.setdefault("masks", {})
    count = 0
    for name, module in student.module.named_modules():
        if isinstance(module, nn.Linear) and ".layer." in f".{name}." and module.in_features % 4 == 0:
            mask = mask_2to4(module.weight)
            with torch.no_grad():
                module.weight.mul_(mask)
            masks[f"{name}.weight"] = mask
            count += 1
    return {"pattern": "2:4", "linear_layers": count}


class _TrtBackend(Backend):
    device = "cuda"
    sparsity = ("2:4",)
    int8 = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return tensorrt_status()

    def prepare(self, student: TextModel, recipe: Recipe) -> TextModel:
        student.info["prepare"] = apply_2to4(student) if recipe.prune > 0 else {"pattern": "dense"}
        return student

    def compile(self, student: TextModel, calibration: CalibrationSet, out_dir: Path,
                recipe: Recipe) -> Artifact:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fscompile-trt-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            student.export_onnx(raw)
            if self.int8:
                qdq_quantize(raw, out_dir / MODEL_FILE, calibration)
            else:
                shutil.copy(raw, out_dir / MODEL_FILE)
        student.save_pretrained(out_dir)
        info: dict[str, Any] = {"calibration_samples": calibration.num_calibration_samples if self.int8 else 0,
                                "size_mb": (out_dir / MODEL_FILE).stat().st_size / 2**20,
                                # TensorRT has no 4-bit gather: its embedding table stays as built
                                "embedding_bits": 8 if self.int8 else 16}
        if recipe.embedding_bits != 8:
            warnings.warn(f"{self.name}: --embedding-bits {recipe.embedding_bits} is ignored "
                          "(TensorRT has no block-quantized embedding lookup)", stacklevel=2)
        ok, why = tensorrt_status()
        if ok:
            build_engine(out_dir / MODEL_FILE, out_dir / ENGINE_FILE, int8=self.int8, seq_len=recipe.seq_len)
            info["engine"] = ENGINE_FILE
        else:
            info["engine"] = None
            info["engine_skipped"] = why
        return Artifact(out_dir, MODEL_FILE, "int8" if self.int8 else "fp16", info)

    def load(self, artifact: Artifact):
        """The TensorRT engine where it was built, else the ONNX graph on ONNX Runtime's CPU."""
        if artifact.info.get("engine") and tensorrt_status()[0]:
            return TrtRunner(artifact.path / ENGINE_FILE)
        return OrtRunner(artifact.path / artifact.model_file)


class TrtInt8Backend(_TrtBackend):
    """TensorRT INT8 (explicit QDQ) with 2:4 sparse weights."""

    name = "trt-int8"
    precisions = ("int8",)
    calibration_methods = ("minmax",)
    description = "TensorRT INT8 from an explicit-quantization QDQ ONNX, 2:4 sparse weights"
    int8 = True


class TrtFp16Backend(_TrtBackend):
    """TensorRT FP16 with 2:4 sparse weights."""

    name = "trt-fp16"
    precisions = ("fp16",)
    description = "TensorRT FP16, 2:4 sparse weights"


def qdq_quantize(raw: Path, dst: Path, calibration: CalibrationSet) -> None:
    """Symmetric INT8 QDQ (what TensorRT's explicit quantization expects): S8 activations and
    per-channel S8 weights on the MatMuls; zeros stay zeros, so 2:4 patterns survive."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    quantize_static(str(raw), str(dst), ReaderFromBatches(calibration.calibrate), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "QDQKeepRemovableActivations": True})


def build_engine(onnx_path: Path, engine_path: Path, *, int8: bool, seq_len: int, max_batch: int = 32) -> None:
    """Build a serialized TensorRT engine with sparse weights and dynamic batch/sequence."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StageError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, (1, 1), (8, seq_len), (max_batch, 512))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise StageError("TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(blob))


class TrtRunner:
    """``runner(batch) -> logits`` on a TensorRT engine (buffers held as CUDA torch tensors)."""

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TargetUnavailable(f"cannot load TensorRT engine {engine_path}")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.stream = torch.cuda.Stream()

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {n: torch.from_numpy(batch[n]).to("cuda", dtype=torch.int64) for n in self.inputs}
        for n, t in feeds.items():
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("logits")), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address("logits", out.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return out.cpu().numpy()
