"""ONNX Runtime targets: ``ort-fp32`` and ``ort-int8`` (CPU).

INT8 builds two candidates and keeps the better one on this device (accuracy first, then
latency): dynamic per-channel INT8 on the attention-fused graph, and static QDQ calibrated
on the shots. On x86 CPUs the dynamic one usually wins: static QDQ with default settings is
slow (S8S8 kernels are not fused) and inaccurate (quantizing every op of a transformer).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration import SELECTION, CalibrationSet, ReaderFromBatches, choose, methods, retention_change
from ..errors import StageError
from ..models.text import TextModel
from ..profile import cpu_info, latency, physical_cores
from . import Artifact, Backend, Recipe

MODEL_FILE = "model.onnx"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def vnni_flags() -> dict[str, bool]:
    """Which INT8 dot-product instruction sets this CPU has."""
    isa = cpu_info()["isa"]
    return {f: bool(isa.get(f)) for f in VNNI_FLAGS}


def session(path: Path | str, threads: int | None = None):
    """A CPU inference session with threads pinned to the physical cores."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtRunner:
    """``runner(batch) -> logits`` over an ONNX Runtime session (feeds only the inputs it has)."""

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        self.sess = session(path, threads)
        self.names = [i.name for i in self.sess.get_inputs()]
        outputs = [o.name for o in self.sess.get_outputs()]
        # a causal LM also returns its key/value cache ("present.*"): only the logits are scored
        self.outputs = ["logits"] if "logits" in outputs else outputs

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``logits``; a model with several outputs (QA: start, end) gets them stacked last."""
        outs = self.sess.run(self.outputs, {k: batch[k] for k in self.names})
        return outs[0] if len(outs) == 1 else np.stack(outs, -1)


def decisions(logits: np.ndarray) -> np.ndarray:
    """What a model decides: the class, the next token per position (LM logits [B, L, vocab]),
    or per output the position (span logits [B, L, 2])."""
    return logits.argmax(1) if logits.ndim == 3 and logits.shape[-1] == 2 else logits.argmax(-1)


def fuse(src: Path, dst: Path, model: TextModel, embed_layer_norm: bool = True) -> dict[str, int]:
    """ORT's transformer optimizer: fused attention, LayerNorm, GELU. Returns fused op counts.
    ``embed_layer_norm=False`` keeps the embedding lookup a plain Gather (to quantize it alone)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", 0)
    if hasattr(model, "attention_geometry"):  # pruned heads: fewer heads, a narrower attention
        heads, hidden = model.attention_geometry()
    kind = model.fusion or "bert"  # "gpt2" for GPT-2 decoders
    options = FusionOptions(kind)
    options.enable_embed_layer_norm = embed_layer_norm
    opt = optimizer.optimize_model(str(src), model_type=kind, num_heads=heads, hidden_size=hidden,
                                   opt_level=1, optimization_options=options)
    opt.save_model_to_file(str(dst), use_external_data_format=False)
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def dynamic_int8(src: Path, dst: Path, *, fused: bool, reduce_range: bool = False) -> Path:
    """Dynamic INT8 with per-channel S8 weights (the recipe that holds accuracy, NOTES-stack.md).
    A graph fused by ORT's optimizer needs ``DefaultTensorType`` for its contrib ops."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if fused else {}
    quantize_dynamic(src, dst, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                     extra_options=extra)
    return dst


def embedding_block_size(width: int, block_size: int = 128) -> int:
    """Blocks are powers of two from 16; tables narrower than ``block_size`` get smaller ones."""
    while block_size > 16 and block_size > width:
        block_size //= 2
    return block_size


def fake_quantize_embeddings(student: Any, bits: int = 4, block_size: int = 128) -> dict[str, Any] | None:
    """Round the student's word-embedding table to the values the artifact will hold: the
    largest embedding table (the one ``quantize_embeddings`` takes), through ORT's own block
    quantizer math, dequantized in place. Distillation then trains the layers around the
    table that ships (it stays frozen there), and ORT re-quantizes it to the same values.
    Measured on one SST-2 draw: 4-bit rounding the student never saw cost it 1.0 point.
    None (nothing done) for other bit widths, or a table tied to an output layer (LMs)."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    tables = [m for m in student.module.modules() if isinstance(m, torch.nn.Embedding)]
    if bits != 4 or not tables:
        return None
    table = max(tables, key=lambda m: m.weight.numel())
    if any(m.weight is table.weight for m in student.module.modules() if isinstance(m, torch.nn.Linear)):
        return None
    w = table.weight.detach().cpu().numpy().astype(np.float32)
    rows, width = w.shape
    bs = embedding_block_size(width, block_size)
    out = np.empty_like(w)
    for i in range(0, width, bs):  # blocks along the hidden axis, as quantize_embeddings (Gather axis 1)
        q, scale, zero = DefaultWeightOnlyQuantizer.quant_slice_asymmetric(w[:, i:i + bs, None])
        out[:, i:i + bs] = ((q.astype(np.float32) - zero.astype(np.float32)) * scale)[:, :, 0]
    with torch.no_grad():
        table.weight.copy_(torch.from_numpy(out))
    return {"bits": bits, "block_size": bs, "rows": rows}


def quantize_embeddings(src: Path, dst: Path, bits: int = 4, block_size: int = 128) -> Path:
    """The word-embedding table (the largest Gather'd initializer) block-quantized to ``bits``
    with ORT's weight-only quantizer (``GatherBlockQuantized``: rows dequantized on lookup, so
    every token keeps its own vector; nothing is dropped from the vocabulary)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and len(dims.get(n.input[0], [])) == 2]
    if not gathers:
        raise StageError("no embedding lookup (Gather on a weight) found to quantize")
    table = max(gathers, key=lambda n: int(np.prod(dims[n.input[0]])))
    block_size = embedding_block_size(dims[table.input[0]][1], block_size)
    axes = (("Gather", 1),)  # blocks run along the hidden axis: one row = one token's vector
    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits,
                                        op_types_to_quantize=("Gather",), quant_axes=axes)
    # ORT quantizes every Gather of op_types_to_quantize whatever nodes_to_include says: the other tables (positions,
    # token types) are excluded by name. fake_quantize_embeddings rounds only this table in training, and
    # GatherBlockQuantized costs ~3 us a row here: 4-bit position rows cost a 2-layer AG News build 0.42 of 2.97 ms
    others = [n.name for n in gathers if n is not table]
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, nodes_to_include=[table.name],
                             nodes_to_exclude=others, op_types_to_quantize=("Gather",), quant_axes=axes,
                             algo_config=algo)
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero rows (padding) have scale 0; ORT handles it
        q.process()
    reduce_axes_as_inputs(q.model.model)  # the quantizer lifts the opset to 21 without converting any node
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


# Reductions whose ``axes`` moved from an attribute to an input in opset 18 (ReduceSum did in 13).
AXES_INPUT_SINCE_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                       "ReduceMin", "ReduceProd", "ReduceSumSquare")


def reduce_axes_as_inputs(model: Any) -> int:
    """Rewrite ``axes`` attributes of opset-17 reductions as inputs, for a graph whose opset import
    was lifted to 18+ (a sentence-transformers body's normalisation is a ReduceL2). Returns how many."""
    import onnx

    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 18:
        return 0
    done = 0
    for node in model.graph.node:
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if node.op_type not in AXES_INPUT_SINCE_18 or axes is None:
            continue
        name = f"{node.name or node.output[0]}_axes"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(list(axes.ints), dtype=np.int64), name))
        node.attribute.remove(axes)
        node.input.append(name)
        done += 1
    return done


def weight_only_int4(src: Path, dst: Path, block_size: int = 32) -> Path:
    """4-bit weight-only: every MatMul weight in blocks of ``block_size`` (``MatMulNBits``, ORT's own
    quantizer) and the word-embedding table likewise (``GatherBlockQuantized``); activations stay
    float. What CPU LLM deployments ship: decoding at batch 1 is bound by reading weights, which
    4 bits halve against INT8. ``accuracy_level=4`` lets ORT's kernel multiply in int8 (VNNI/AMX)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    emb = quantize_embeddings(src, dst.with_name(f"{dst.stem}-emb.onnx"), bits=4)
    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=4)
    q = MatMulNBitsQuantizer(onnx.load(str(emb)), block_size=block_size, is_symmetric=True, accuracy_level=4,
                             algo_config=algo)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def onnx_size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


class _OrtBackend(Backend):
    device = "cpu"
    sparsity = ("structured-heads", "structured-ffn-channels")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False, "onnxruntime has no CPU execution provider"
        return True, ""

    quantizes_embeddings = True  # INT8 builds store the word-embedding table at recipe.embedding_bits

    def prepare(self, student: TextModel, recipe: Recipe) -> TextModel:
        """CPU runtimes gain nothing from scattered zeros: prune whole heads and FFN channels.
        A low-bit embedding table goes in now too, so distillation sees what ships."""
        student.info["prepare"] = student.prune(recipe.prune, heads=recipe.prune_heads)
        if self.quantizes_embeddings and recipe.embedding_bits < 8:
            student.info["prepare"]["embedding_table"] = fake_quantize_embeddings(student, recipe.embedding_bits)
        return student

    def load(self, artifact: Artifact) -> OrtRunner:
        return OrtRunner(artifact.path / artifact.model_file)

    @staticmethod
    def _export(student: TextModel, work: Path, recipe: Recipe) -> tuple[Path, Path, dict[str, Any]]:
        """Export to ``raw.onnx`` and fuse into ``fused.onnx``; returns what fusion did. With
        4-bit embeddings the embedding lookup stays unfused so that it can be quantized."""
        raw, fused = work / "raw.onnx", work / "fused.onnx"
        student.export_onnx(raw)
        if student.fusion is None:  # nothing for the transformer optimizer (CNNs): ORT fuses Conv+BN at load
            shutil.copy(raw, fused)
            return raw, fused, {"fused_ops": {}}
        try:
            return raw, fused, {"fused_ops": fuse(raw, fused, student, recipe.embedding_bits == 8),
                                "embedding_bits": recipe.embedding_bits}
        except Exception as e:  # the optimizer may not know this graph: ship it unfused, and say so
            shutil.copy(raw, fused)
            return raw, fused, {"fusion_skipped": str(e).splitlines()[0][:200]}

    @staticmethod
    def _embeddings(path: Path, recipe: Recipe) -> Path:
        """``path`` with its word-embedding table at ``recipe.embedding_bits`` (8: unchanged;
        the INT8 quantizers handle it). Runs before dynamic INT8, which would take the Gather."""
        if recipe.embedding_bits == 8:
            return path
        return quantize_embeddings(path, path.with_name(f"{path.stem}-emb{recipe.embedding_bits}.onnx"),
                                   recipe.embedding_bits)

    @staticmethod
    def _finish(student: TextModel, model_path: Path, out_dir: Path, precision: str,
                info: dict[str, Any]) -> Artifact:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(model_path, out_dir / MODEL_FILE)
        student.save_pretrained(out_dir)
        info["size_mb"] = onnx_size_mb(out_dir / MODEL_FILE)
        return Artifact(out_dir, MODEL_FILE, precision, info)


class OrtFp32Backend(_OrtBackend):
    """ONNX Runtime fp32 with fused attention: the float baseline of every CPU deployment."""

    name = "ort-fp32"
    quantizes_embeddings = False
    precisions = ("fp32",)
    description = "ONNX Runtime, fp32, attention fused by ORT's transformer optimizer"

    def compile(self, student: TextModel, calibration: CalibrationSet, out_dir: Path,
                recipe: Recipe) -> Artifact:
        with tempfile.TemporaryDirectory(prefix="fscompile-ort-") as tmp:
            _, fused, info = self._export(student, Path(tmp), Recipe())  # fp32: no 4-bit tables
            return self._finish(student, fused, out_dir, "fp32", info)


class OrtInt8Backend(_OrtBackend):
    """ONNX Runtime INT8: dynamic per-channel on the fused graph vs static QDQ on the shots."""

    name = "ort-int8"
    precisions = ("int8",)
    calibration_methods = ("minmax", "entropy", "percentile")
    description = "ONNX Runtime INT8 (dynamic per-channel or static QDQ calibrated on the shots)"

    def compile(self, student: TextModel, calibration: CalibrationSet, out_dir: Path,
                recipe: Recipe) -> Artifact:
        with tempfile.TemporaryDirectory(prefix="fscompile-ort-") as tmp:
            work = Path(tmp)
            raw, fused, info = self._export(student, work, recipe)
            candidates: dict[str, Path] = {}
            errors: dict[str, str] = {}
            dyn = work / "dynamic.onnx"
            want = recipe.variant  # None: every candidate, chosen below
            # without VNNI, u8 x s8 products saturate 16-bit intermediates (vpmaddubsw): 7-bit weights
            # avoid that, as cpu-vnni does; on a VNNI CPU the full range is exact
            reduce_range = not any(vnni_flags().values())
            info["reduce_range"] = reduce_range
            if want in (None, "dynamic-per-channel"):
                try:
                    candidates["dynamic-per-channel"] = dynamic_int8(self._embeddings(fused, recipe), dyn, fused=True,
                                                                     reduce_range=reduce_range)
                except Exception as e:  # record and fall back to the other candidate
                    errors["dynamic-per-channel"] = str(e).splitlines()[0][:200]
            if student.weight_only_int4 and want in (None, "weight-only-int4"):
                try:
                    candidates["weight-only-int4"] = weight_only_int4(fused, work / "int4.onnx")
                except Exception as e:
                    errors["weight-only-int4"] = str(e).splitlines()[0][:200]
            tried = methods(recipe.calibration, self.calibration_methods) if student.static_qdq else ()
            if want is not None:
                tried = tuple(m for m in tried if want == f"static-qdq-{m}")
            pre = work / "pre.onnx"
            try:
                if tried:
                    self._preprocess(raw, pre)
            except Exception as e:
                errors["static-qdq"] = f"pre-processing failed: {str(e).splitlines()[0][:200]}"
                tried = ()
            for method in tried:
                name, stat = f"static-qdq-{method}", work / f"static-{method}.onnx"
                try:
                    self._static(pre, stat, calibration, student, method, reduce_range)
                    candidates[name] = self._embeddings(stat, recipe)
                except Exception as e:  # one calibrator failing must not sink the others; it is recorded
                    errors[name] = str(e).splitlines()[0][:200]
            if not candidates:
                raise StageError(f"INT8 quantization failed: {errors}")
            choice, table = self._choose(fused, candidates, calibration, recipe.seq_len, errors,
                                         recipe.variant_limits)
            info.update({"variant": choice, "candidates": table, "errors": errors,
                    "calibration_samples": calibration.num_calibration_samples,
                    "validation_samples": calibration.num_validation_samples,
                    "selection": SELECTION})
            precision = "int4-weight-only" if choice == "weight-only-int4" else "int8"
            return self._finish(student, candidates[choice], out_dir, precision, info)

    @staticmethod
    def _preprocess(raw: Path, pre: Path) -> None:
        """ORT's quantization pre-processing (shape inference, graph clean-up)."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # skip_symbolic_shape: symbolic inference fails on these exports; on failure the tool
        # leaves large <uuid>.data files in the working directory, so run it inside ours.
        with contextlib.chdir(pre.parent):
            quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)

    @staticmethod
    def _static(pre: Path, dst: Path, calibration: CalibrationSet, student: TextModel, method: str,
                reduce_range: bool = False) -> None:
        """Static QDQ with the settings that hold accuracy on transformers (NOTES-stack.md):
        U8 activations, S8 per-channel weights, the ops the model names (MatMuls for transformers,
        Conv/Gemm too for CNNs), transformer FFN-down MatMuls left in fp32
        because their inputs carry activation outliers."""
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        model = onnx.load(str(pre))
        inits = {i.name: i.dims for i in model.graph.initializer}
        ffn = getattr(student.config, "intermediate_size", None) or getattr(student.config, "hidden_dim", None)
        ops = list(student.quant_ops)
        exclude = [n.name for n in model.graph.node if n.op_type == "MatMul"
                   and any(list(inits.get(x, [])[:1]) == [ffn] for x in n.input)]
        calibrators = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
        if method not in calibrators:
            raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(calibrators)}")
        quantize_static(str(pre), str(dst), ReaderFromBatches(calibration.calibrate),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=ops, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude, calibrate_method=calibrators[method], reduce_range=reduce_range,
                        extra_options={"CalibMovingAverage": True} if method == "minmax" else {})

    @staticmethod
    def _choose(reference: Path, candidates: dict[str, Path], calibration: CalibrationSet, seq_len: int,
                errors: dict[str, str], limits: tuple[float | None, float | None] = (None, None),
                ) -> tuple[str, dict[str, dict[str, float]]]:
        """The variant to keep, and every candidate's figures; one that ONNX Runtime will not load
        is recorded in ``errors`` and left out, as one that failed to build."""
        ref = OrtRunner(reference)
        ref_pred = [decisions(ref(b)) for b in calibration.validate]
        read = calibration.validate_probabilities if len(candidates) > 1 else None  # nothing to choose
        probs, ref_all = (np.concatenate(read), np.concatenate(ref_pred)) if read is not None else (None, None)
        table: dict[str, dict[str, float]] = {}
        for name, path in candidates.items():
            try:
                run = OrtRunner(path)
            except Exception as e:  # an invalid graph from a quantizer: the others may still serve
                errors[name] = f"does not load: {str(e).splitlines()[0][:200]}"
                continue
            pred = [decisions(run(b)) for b in calibration.validate]
            agree = np.concatenate([(p == r).reshape(-1) for p, r in zip(pred, ref_pred)])
            judged = {}
            if probs is not None:  # what the teacher says the disagreements cost
                change, se = retention_change(probs, np.concatenate(pred), ref_all)
                judged = {"retention_change": change, "retention_change_se": se}
            # a real validation row repeated to the profiling length: valid ids for any vocabulary
            probe = {k: np.resize(v[:1], (1, seq_len)) if v.ndim == 2 else v[:1]  # images keep their shape
                     for k, v in calibration.validate[0].items()}
            lat = latency(lambda: run(probe), warmup=2, min_reps=10, max_reps=60, budget_s=1.0)
            table[name] = {"agreement": float(agree.mean()), **judged, "b1_p50_ms": lat["p50_ms"],
                           "size_mb": onnx_size_mb(path)}
        if not table:
            raise StageError(f"INT8 quantization failed: {errors}")
        return choose(table, calibration.num_validation_samples, limits), table
