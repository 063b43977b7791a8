"""Which CPU INT8 path for ``cpu-vnni`` (issue 4): Neural Compressor's PyTorch INT8 vs ONNX Runtime.

    python benchmarks/cpu_int8_paths.py --out bench-out/cpu-int8-paths

Distils one student (the default compile recipe, 10 shots, seed 0) and quantizes it both ways,
measured side by side in this one process on the same dev rows and the same probe input:
  ORT fp32 (fused)              the float baseline of the ONNX path
  ORT dynamic INT8 (fused)      what ``cpu-vnni`` ships (per-channel S8 weights, offline-optimised graph)
  torch eager fp32              the float baseline of the PyTorch path
  torch.compile fp32            inductor, freezing on
  INC dynamic INT8 + inductor   Neural Compressor 3.10: PT2E export, X86InductorQuantizer
                                (DynamicQuantConfig), torch.compile with freezing (its documented flow)
Needs ``pip install neural-compressor-pt==3.10`` (not a dependency of fscompile: it pulls torchao).
Writes table.md and results.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FSCOMPILE_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(SHARED / "teachers/minilm-sst2"))
    p.add_argument("--data", default=str(SHARED / "data/glue_sst2"))
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--out", default=str(REPO / "bench-out/cpu-int8-paths"))
    return p.parse_args()


def torch_runner(module):
    import torch

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return module(*(torch.from_numpy(batch[k]) for k in NAMES)).float().numpy()
    return run


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    import torch
    from fscompile.backends.onnxruntime import OrtRunner, dynamic_int8, fuse
    from torch.export import Dim

    from fscompile.config import CompileConfig
    from fscompile.evaluate import metrics, predict
    from fscompile.models.text import export_onnx
    from fscompile.pipeline import distill_stage
    from fscompile.profile import latency, physical_cores

    torch.set_num_threads(physical_cores())
    cfg = CompileConfig(teacher=args.teacher, data=args.data, shots=args.shots, max_eval=args.max_eval)
    d = distill_stage(cfg, None, lambda *a: None)
    student, task = d.student, d.task
    labels = np.array([e.label for e in task.eval])
    probe = {"input_ids": np.full((1, args.seq_len), 2000, dtype=np.int64),
             "attention_mask": np.ones((1, args.seq_len), dtype=np.int64),
             "token_type_ids": np.zeros((1, args.seq_len), dtype=np.int64)}

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    fp = Logits(student.module).eval()
    runners, build_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        export_onnx(student, work / "raw.onnx")
        fuse(work / "raw.onnx", work / "fused.onnx", student)
        runners["ORT fp32 (fused)"] = OrtRunner(work / "fused.onnx")
        build_s["ORT fp32 (fused)"] = time.perf_counter() - t
        t = time.perf_counter()
        dynamic_int8(work / "fused.onnx", work / "int8.onnx", fused=True)
        runners["ORT dynamic INT8 (fused)"] = OrtRunner(work / "int8.onnx")
        build_s["ORT dynamic INT8 (fused)"] = time.perf_counter() - t
        runners["torch eager fp32"] = torch_runner(fp)
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
        runners["torch.compile fp32"] = torch_runner(torch.compile(copy.deepcopy(fp)))
        try:
            from neural_compressor.torch.export import export
            from neural_compressor.torch.quantization import (
                DynamicQuantConfig,
                convert,
                prepare,
            )

            t = time.perf_counter()
            enc = student.encode(["an export probe", "a second and somewhat longer export probe"])
            dims = {k: {0: Dim("batch", max=256), 1: Dim("seq", min=2, max=512)} for k in NAMES}
            exported = export(model=copy.deepcopy(fp), example_inputs=tuple(enc[k] for k in NAMES), dynamic_shapes=dims)
            q = convert(prepare(exported, quant_config=DynamicQuantConfig()))
            runners["INC dynamic INT8 + inductor"] = torch_runner(torch.compile(q))
            build_s["INC dynamic INT8 + inductor"] = time.perf_counter() - t
        except ImportError as e:
            print(f"Neural Compressor not installed ({e}): pip install neural-compressor-pt==3.10", file=sys.stderr)
        rows = []
        for name, run in runners.items():
            t = time.perf_counter()
            run(probe)  # first call: compilation for the torch.compile variants
            first = time.perf_counter() - t
            logits = predict(run, student.tokenizer, student.input_names, task.eval)
            lat = latency(lambda: run(probe), warmup=5, min_reps=30, max_reps=300, budget_s=5.0)
            rows.append({"path": name, "accuracy": metrics(logits, labels)["accuracy"],
                         "b1_p50_ms": lat["p50_ms"], "b1_p99_ms": lat["p99_ms"],
                         "build_s": build_s.get(name), "first_call_s": first})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Student: {len(d.keep)} of the teacher's layers ({d.keep}), {args.shots} shots, seed 0; "
             f"dev rows {len(task.eval)}; batch 1, seq {args.seq_len}, {physical_cores()} threads.", "",
             "| path | dev accuracy | b1 p50 ms | b1 p99 ms | build s | first call s |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = f"{r['build_s']:.1f}" if r["build_s"] is not None else "-"
        lines.append(f"| {r['path']} | {r['accuracy']:.4f} | {r['b1_p50_ms']:.2f} | {r['b1_p99_ms']:.2f} | {b} | "
                     f"{r['first_call_s']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
