"""Latency and peak memory, measured in a fresh process per model; the device recorded.

Run as ``python -m fscompile.profile '<json request>'`` by :func:`profile_model`, so one
model's memory never hides in another's and the parent's imports do not count.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StageError

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover
        return os.cpu_count() or 1


def cpu_info() -> dict[str, Any]:
    """CPU model, core counts and the instruction sets that matter for INT8 kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "isa": {f: f in flags for f in ISA_FLAGS}}


def device_info() -> dict[str, Any]:
    """The machine and library versions a report needs to be reproducible."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("fscompile", "torch", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    except ImportError:  # pragma: no cover
        pass
    return {"cpu": cpu_info(), "gpu": gpu, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "git_commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def latency(run: Callable[[], Any], warmup: int = 3, min_reps: int = 10, max_reps: int = 200,
            budget_s: float = 3.0) -> dict[str, float]:
    """Warm up, then repeat until ``budget_s`` (at least ``min_reps``) and summarise in ms."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    a = np.array(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "reps": len(times)}


def per_turn(runs: list[Callable[[], Any]], rounds: int = 5, budget_s: float = 0.5) -> np.ndarray:
    """Batch p50 (ms) of each of ``runs`` in each of ``rounds`` passes over all of them (``budget_s`` each
    in all), as [run, round]: on a shared VM whose speed drifts by a third within minutes, figures taken
    one after another compare the minutes as much as the models; taken in turns, they see the same machine."""
    per = [[] for _ in runs]
    for r in range(rounds):
        for run, times in zip(runs, per):
            times.append(latency(run, warmup=2 if r == 0 else 1, min_reps=3, budget_s=budget_s / rounds)["p50_ms"])
    return np.array(per)


def in_turns(runs: list[Callable[[], Any]], rounds: int = 5, budget_s: float = 0.5) -> list[float]:
    """Batch p50 (ms) of each of ``runs``, timed in turns (:func:`per_turn`): the median over the rounds."""
    return [float(m) for m in np.median(per_turn(runs, rounds, budget_s), axis=1)]


def synthetic_inputs(names: list[str], batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs: token ids of length ``seq_len``, or ``seq_len`` x ``seq_len`` images."""
    rng = np.random.default_rng(seed)
    if "pixel_values" in names:
        return {"pixel_values": rng.standard_normal((batch, 3, seq_len, seq_len), dtype=np.float32)}
    low = 1000 if vocab > 2000 else 5  # skip special and unused ids where the vocabulary has them
    out = {"input_ids": rng.integers(low, vocab, size=(batch, seq_len), dtype=np.int64),
           "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
           "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64)}
    return {k: out[k] for k in names}


def peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM starts afresh at exec; ru_maxrss would
    carry the forking parent's peak into the child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_request(req: dict[str, Any]) -> dict[str, Any]:
    """Executed in the child: load one model, time it, report memory."""
    threads = int(req["threads"])
    base_rss = peak_rss_mb()
    if req["kind"] == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        t0 = time.perf_counter()
        sess = ort.InferenceSession(req["path"], opts, providers=req.get("providers") or ["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
        names = [i.name for i in sess.get_inputs() if not i.name.startswith("past_key_values")]
        caches = {i.name: i.shape for i in sess.get_inputs() if i.name.startswith("past_key_values")}

        def make(b, n, past=0):
            """Batch ``b`` of ``n`` new tokens; a causal LM also gets caches of ``past`` tokens."""
            feed = synthetic_inputs(names, b, n, req["vocab"])
            if caches:
                feed["attention_mask"] = np.ones((b, past + n), dtype=np.int64)
                feed.update({k: np.random.default_rng(0).standard_normal((b, s[1], past, s[3]), dtype=np.float32)
                             for k, s in caches.items()})
            return lambda: sess.run(None, feed)
    else:
        import torch

        from .models import load_any

        torch.set_num_threads(threads)
        base_rss = peak_rss_mb()
        t0 = time.perf_counter()
        model = load_any(Path(req["path"]))
        load_s = time.perf_counter() - t0
        names = model.input_names

        def make(b, n):
            feed = {k: torch.from_numpy(v) for k, v in synthetic_inputs(names, b, n, req["vocab"]).items()}

            def run():
                with torch.inference_mode():
                    model.module(**feed)
            return run
    result: dict[str, Any] = {"load_s": load_s, "threads": threads, "seq_len": req["seq_len"]}
    for b in req["batches"]:
        cpu0 = time.process_time()
        lat = latency(make(b, req["seq_len"]), budget_s=req.get("budget_s", 3.0))
        lat["throughput_per_s"] = b * 1e3 / lat["p50_ms"]
        # CPU time (all threads) per sample: what the model costs a shared machine
        lat["cpu_ms_per_sample"] = (time.process_time() - cpu0) * 1e3 / (b * (lat["reps"] + 3))
        result[f"batch{b}"] = lat
    if req.get("real_len"):
        lat = latency(make(1, req["real_len"]), budget_s=req.get("budget_s", 3.0))
        result["real"] = {"seq_len": req["real_len"], "batch1": lat}
    if req["kind"] == "onnx" and caches:  # generation: the seq_len-th token, after seq_len - 1 in the cache
        past = req["seq_len"] - 1
        result["decode"] = {"past_len": past, "batch1": latency(make(1, 1, past), budget_s=req.get("budget_s", 3.0))}
    result["peak_rss_mb"] = peak_rss_mb()
    result["runtime_baseline_rss_mb"] = base_rss
    return result


@dataclass(frozen=True)
class ProfileRequest:
    kind: str  # "onnx" or "torch"
    path: str
    vocab: int
    seq_len: int = 128
    batches: tuple[int, ...] = (1, 8)
    threads: int = 0  # 0 = physical cores
    budget_s: float = 3.0
    real_len: int | None = None  # also time batch 1 at the data's median length


def profile_model(req: ProfileRequest, timeout_s: float = 600) -> dict[str, Any]:
    """Profile one model in a fresh Python process; returns latency per batch and peak RSS."""
    payload = dict(req.__dict__, batches=list(req.batches), threads=req.threads or physical_cores())
    env = dict(os.environ, OMP_NUM_THREADS=str(payload["threads"]), TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run([sys.executable, "-m", "fscompile.profile", json.dumps(payload)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise StageError(f"profiling {req.path} took longer than {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"profiling {req.path} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_all(teacher_dir: Path, student_dir: Path, artifact_file: Path, vocab: int,
                seq_len: int, budget_s: float, real_len: int | None = None) -> dict[str, dict[str, Any]]:
    """Latency and peak memory of each model, each in a fresh process."""
    models = {"teacher": ("torch", teacher_dir), "student": ("torch", student_dir),
              "artifact": ("onnx", artifact_file)}
    return {name: profile_model(ProfileRequest(kind, str(path), vocab, seq_len, budget_s=budget_s, real_len=real_len))
            for name, (kind, path) in models.items()}


if __name__ == "__main__":
    print(json.dumps(_run_request(json.loads(sys.argv[1]))))
