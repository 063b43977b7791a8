"""``fscompile bench``: a sweep of shots x seeds x targets with peers, as resumable results
and mean ± std tables (``results.jsonl``, ``table.md``, ``table.csv``, ``pareto.png``).

Each job is one shot draw (shots, seed): it distils one target-agnostic student, then for
every target applies that target's sparsity with a short recovery distillation, compiles,
evaluates and profiles, and builds the peers on the same shots. Jobs are independent, so they
run in parallel processes (``--jobs``) or as Ray tasks (``--ray``) and append to one file.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from .config import CompileConfig, DistillConfig
from .errors import InputError
from .report import append_jsonl

RESULTS = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A benchmark sweep; from flags or a YAML/TOML file with the same keys."""

    teacher: str = "minilm"
    data: str | None = None
    targets: tuple[str, ...] = ("ort-int8",)
    shots: tuple[int, ...] = (5, 10, 20)
    seeds: int = 5
    steps: int | None = None  # None: a compile's default (DistillConfig.resolved)
    recovery_steps: int = 200
    prune: float | None = None  # None: the task's default, as for a compile
    max_eval: int | None = None
    profile_seconds: float = 3.0
    peers: bool = True
    student_layers: str | None = None
    student: str | None = None  # image tasks: student architecture
    weights: str | None = None  # image tasks: teacher state dict
    image_size: int | None = None
    generator: str = "smollm2"  # text classification: the LM that writes in-domain inputs ("none": off)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Sweep:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read sweep config {p}: {e.strerror}") from None
        try:
            if p.suffix.lower() == ".toml":
                import tomllib

                raw = tomllib.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as e:  # both parsers raise their own error types
            raise InputError(f"{p}: not valid {p.suffix[1:].upper()} ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{p}: expected a mapping of sweep options")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise InputError(f"{p}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("targets", "shots"):
            if isinstance(raw.get(key), str):
                raw[key] = [x.strip() for x in raw[key].split(",")]
        return cls(**{**raw, "targets": tuple(raw.get("targets", cls.targets)),
                      "shots": tuple(int(s) for s in raw.get("shots", cls.shots))})

    def jobs(self) -> list[tuple[int, int]]:
        return [(s, seed) for s in self.shots for seed in range(self.seeds)]


def load_results(dirs: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        f = Path(d) / RESULTS
        if not f.is_file():
            raise InputError(f"no {RESULTS} in {d}")
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise InputError(f"{f}:{n}: not a JSON line (an interrupted write?)") from None
    return rows


def done_jobs(out: Path) -> set[tuple[int, int]]:
    """(shots, seed) pairs whose job finished: a job writes a ``job-done`` row last."""
    f = out / RESULTS
    if not f.is_file():
        return set()
    return {(r["shots"], r["seed"]) for r in load_results([out]) if r.get("kind") == "job-done"}


def run_job(sweep: Sweep, shots: int, seed: int, out: str, threads: int | None = None) -> list[dict[str, Any]]:
    """One shot draw: distil once, build every target and the peers; rows appended to results."""
    import torch

    from .backends import get_backend
    from .peers import build_peers
    from .pipeline import build, distill_stage, retarget
    from .tasks import get_task

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    cfg = CompileConfig(teacher=sweep.teacher, data=sweep.data, target=sweep.targets[0], shots=shots, seed=seed,
                        prune=sweep.prune, max_eval=sweep.max_eval, profile_seconds=sweep.profile_seconds,
                        student_layers=sweep.student_layers, student=sweep.student, weights=sweep.weights,
                        image_size=sweep.image_size, distill=DistillConfig(steps=sweep.steps, generator=sweep.generator))
    start = time.perf_counter()
    base = distill_stage(cfg, None, _quiet)
    distill_s = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    key = {"shots": shots, "seed": seed}
    for target in sweep.targets:
        backend = get_backend(target)
        tcfg = dataclasses.replace(cfg, target=target, export_only=not backend.available()[0])
        t = time.perf_counter()
        # the recovery never outlasts the distillation itself (short sweeps stay short)
        d = retarget(base, backend, tcfg, min(sweep.recovery_steps, base.stats.steps), _quiet)
        # target names come from plugins: keep them from naming a path outside the results directory
        run_dir = out_dir / "runs" / f"{shots}shot-seed{seed}-{re.sub(r'[^A-Za-z0-9_.-]', '_', target).lstrip('.')}"
        run_dir.mkdir(parents=True, exist_ok=True)
        m = build(d, backend, tcfg, run_dir, _quiet, t)
        rows.append({**key, "system": f"fscompile {target}", "kind": "fscompile", "target": target,
                     **m["metrics"]["artifact"], "student_accuracy": m["metrics"]["student"]["accuracy"],
                     "size_mb": m["size_mb"]["artifact"], "profile": m["profile"]["artifact"],
                     "build_s": time.perf_counter() - t + distill_s, "distill_s": distill_s,
                     "layers_kept": m["student"]["layers_kept"], "verification": m["verification"]["failed"],
                     "compile_peak_rss_mb": m["compile_peak_rss_mb"], "device": m["device"]})
    if sweep.peers:
        adapter = get_task(cfg)
        # calibrated for the teacher's own inputs (a causal LM's caches have its block count)
        teacher_cal = adapter.calibration(dataclasses.replace(base, student=base.teacher), cfg)
        for r in build_peers(base, adapter, teacher_cal, cfg):
            rows.append({**key, **r})
    rows.append({**key, "kind": "job-done", "seconds": time.perf_counter() - start})
    append_jsonl(out_dir / RESULTS, rows)
    return rows


def _quiet(stage: str, done: int, total: int, detail: str = "") -> None:
    pass


def run_sweep(sweep: Sweep, out: Path, jobs: int = 1, use_ray: bool = False, echo=print) -> list[dict[str, Any]]:
    """Run every job not already done (resume), then write the tables and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(dataclasses.asdict(sweep), indent=2))
    todo = [j for j in sweep.jobs() if j not in done_jobs(out)]
    if len(todo) < len(sweep.jobs()):
        echo(f"resuming: {len(sweep.jobs()) - len(todo)} of {len(sweep.jobs())} jobs already in {out / RESULTS}")
    if use_ray:
        _run_ray(sweep, todo, out)
    elif jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_job, sweep, s, seed, str(out), threads): (s, seed) for s, seed in todo}
            for f in as_completed(futures):
                f.result()
                echo(f"done: {futures[f][0]} shots, seed {futures[f][1]}")
    else:
        for s, seed in todo:
            run_job(sweep, s, seed, str(out))
            echo(f"done: {s} shots, seed {seed}")
    rows = load_results([out])
    write_tables(rows, out)
    return rows


def _run_ray(sweep: Sweep, todo: list[tuple[int, int]], out: Path) -> None:
    """One Ray task per job; each appends to the same results file (a shared filesystem)."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'ray[default]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    task = ray.remote(run_job)
    ray.get([task.remote(sweep, s, seed, str(out)) for s, seed in todo])


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std per (system, shots); ratios are computed pair by pair within a shot draw."""
    runs = [r for r in rows if r.get("kind") in ("fscompile", "peer")]
    teacher = {(r["shots"], r["seed"]): r for r in runs if r["system"] == "teacher PyTorch fp32"}
    strongest = {(r["shots"], r["seed"]): r for r in runs if r["system"] == "teacher fused + ORT dynamic INT8"}
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in runs:
        c = cells.setdefault((r["system"], r["shots"]), {})
        b1 = r["profile"]["batch1"]["p50_ms"]
        vals = {"accuracy": r["accuracy"], "size_mb": r["size_mb"], "b1_p50": b1,
                "b1_p99": r["profile"]["batch1"]["p99_ms"], "b8_p50": r["profile"]["batch8"]["p50_ms"],
                "peak_mb": r["profile"]["peak_rss_mb"],
                "cpu_ms_per_sample": r["profile"]["batch8"].get("cpu_ms_per_sample", float("nan"))}
        vals.update({k: r[k] for k in ("macro_f1", "perplexity") if k in r})  # per task
        if "real" in r["profile"]:
            vals["real_b1_p50"] = r["profile"]["real"]["batch1"]["p50_ms"]
        t = teacher.get((r["shots"], r["seed"]))
        if t:
            # a teacher at 0 (e.g. EM of an untrained QA head) has nothing to retain
            vals["retention"] = r["accuracy"] / t["accuracy"] if t["accuracy"] else float("nan")
            vals["speedup_vs_teacher"] = t["profile"]["batch1"]["p50_ms"] / b1
            vals["smaller_than_teacher"] = t["size_mb"] / r["size_mb"]
        s = strongest.get((r["shots"], r["seed"]))
        if s:
            vals["speedup_vs_strongest_peer"] = s["profile"]["batch1"]["p50_ms"] / b1
        for k, v in vals.items():
            c.setdefault(k, []).append(v)
    out = []
    for (system, shots), c in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        out.append({"system": system, "shots": shots, "n": len(c["accuracy"]),
                    **{k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in c.items()}})
    return out


COLUMNS = [("accuracy", "accuracy"), ("retention", "% of teacher"), ("perplexity", "perplexity"), ("size_mb", "MB"),
           ("smaller_than_teacher", "× smaller"), ("b1_p50", "b1 p50 ms"), ("b1_p99", "b1 p99 ms"),
           ("real_b1_p50", "b1 p50 ms (real len)"), ("b8_p50", "b8 p50 ms"),
           ("speedup_vs_teacher", "× faster than teacher"), ("speedup_vs_strongest_peer", "× faster than strongest peer"),
           ("peak_mb", "peak RSS MB"), ("cpu_ms_per_sample", "CPU ms/sample (b8)")]


def write_tables(rows: list[dict[str, Any]], out: Path) -> str:
    """table.md, table.csv and pareto.png from result rows."""
    summary = summarise(rows)
    columns = [c for c in COLUMNS if any(c[0] in s for s in summary)]  # e.g. perplexity for text generation only
    head = "| system | shots | n | " + " | ".join(h for _, h in columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "shots", "n"] + [x for k, _ in columns for x in (f"{k}_mean", f"{k}_std")])
        for s in summary:
            cells = []
            for k, _ in columns:
                v = s.get(k)
                cells.append("—" if v is None else (f"{v['mean']:.4f} ± {v['std']:.4f}" if k in ("accuracy", "retention")
                                                    else f"{v['mean']:.2f} ± {v['std']:.2f}"))
            lines.append(f"| {s['system']} | {s['shots']} | {s['n']} | " + " | ".join(cells) + " |")
            w.writerow([s["system"], s["shots"], s["n"]] +
                       [x for k, _ in columns for x in ((s[k]["mean"], s[k]["std"]) if k in s else ("", ""))])
    dev = next((r["device"] for r in rows if r.get("device")), None)
    if dev:
        lines += ["", f"Device: {dev['cpu']['model']}, {dev['cpu']['physical_cores']} cores, ISA "
                      f"{', '.join(k for k, v in dev['cpu']['isa'].items() if v)}; GPU {dev['gpu'] or 'none'}; "
                      f"versions {dev['versions']}; fscompile commit {dev['git_commit']}."]
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    pareto(summary, out / "pareto.png")
    return md


def pareto(summary: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs batch-1 latency: one point per system x shots; teacher and peers marked."""
    from .report import figure

    with figure(path, "batch-1 latency p50 (ms)", "accuracy", "fscompile (blue) vs peers (grey squares)") as ax:
        for s in summary:
            peer = not s["system"].startswith("fscompile")
            ax.errorbar(s["b1_p50"]["mean"], s["accuracy"]["mean"], xerr=s["b1_p50"]["std"],
                        yerr=s["accuracy"]["std"], fmt="s" if peer else "o", color="grey" if peer else "tab:blue",
                        capsize=2)
            ax.annotate(f"{s['system']} ({s['shots']})", (s["b1_p50"]["mean"], s["accuracy"]["mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
