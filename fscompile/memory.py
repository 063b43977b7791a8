"""The recipe memory: one JSON line per build (compile, bench draw or search trial) saying what was
tried and what it measured, in ``$FSCOMPILE_CACHE/recipes.jsonl``. The budget search ranks its
candidates for a new task from the rows of the nearest tasks."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from .config import DEFAULT_STEPS
from .report import append_jsonl

MEMORY_FILE = "recipes.jsonl"
# The prior weighs as much as a row this far away: a same-recipe row on a similar task outweighs it,
# rows of other recipes or unlike tasks do not.
PRIOR_DISTANCE = 0.5


def memory_path() -> Path:
    """``$FSCOMPILE_MEMORY`` (a team can share one file), else ``recipes.jsonl`` in the cache."""
    if os.environ.get("FSCOMPILE_MEMORY"):
        return Path(os.environ["FSCOMPILE_MEMORY"])
    root = Path(os.environ.get("FSCOMPILE_CACHE", Path.home() / ".cache" / "fscompile"))
    return root / MEMORY_FILE


def row_from_manifest(m: dict[str, Any], source: str = "compile") -> dict[str, Any]:
    """What the search needs to learn from one build: the task's traits, the recipe, the figures."""
    cfg, art, teacher = m["config"], m["metrics"].get("artifact", {}), m["metrics"].get("teacher", {})
    layers, n_teacher = m["student"].get("layers_kept") or [], m["student"].get("teacher_layers")
    fraction = len(layers) / n_teacher if layers and n_teacher else m["parameters"]["student"] / m["parameters"]["teacher"]
    acc, t_acc = art.get("accuracy"), teacher.get("accuracy")
    prep = m["student"].get("prepare") or {}
    return {
        "source": source,
        "task": m["task"],
        "teacher": cfg["teacher"],
        "teacher_type": m["teacher"].get("model_type"),
        "teacher_parameters": m["parameters"]["teacher"],
        "labels": len(m["data"].get("label_names") or []),
        "shots": cfg["shots"],
        "text_length": m["data"].get("real_seq_len"),
        "target": m["target"]["name"],
        "recipe": {"layers": len(layers), "layer_fraction": fraction,
                   "layer_choice": "selected" if m["student"].get("layer_selection") else "spaced",
                   # against the default count (--steps given: against DEFAULT_STEPS, exact for short texts)
                   "steps_scale": (cfg["distill"]["steps"] / DEFAULT_STEPS if cfg["distill"].get("steps")
                                   else cfg["distill"].get("steps_scale", 1.0)),
                   "prune": prep.get("rate", cfg.get("prune") or 0.0), "embedding_bits": cfg["embedding_bits"],
                   "steps": m["distillation"].get("steps"), "transfer": m["distillation"].get("transfer_size"),
                   "variant": m["artifact"].get("variant"), "teacher_layers": n_teacher},
        "latency_ms": m["profile"]["artifact"].get("batch1", {}).get("p50_ms"),
        "size_mb": m["size_mb"]["artifact"],
        "peak_mb": m["profile"]["artifact"].get("peak_rss_mb"),
        "agreement": art.get("agreement"),
        "retention_estimate": art.get("retention_estimate"),
        "retention_estimates": art.get("retention_estimates"),
        "retention_estimate_sd": art.get("retention_estimate_sd"),
        "retention": acc / t_acc if acc is not None and t_acc else None,
        "cpu": m["device"]["cpu"].get("model"),
        "fingerprint": m["fingerprint"],
    }


def record(row: dict[str, Any], path: Path | None = None) -> None:
    """Append ``row`` under an exclusive lock, as one write (parallel bench jobs share the file).
    A memory that cannot be written costs the next search trials, never this compile: it warns."""
    path = path or memory_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, [row])
    except OSError as e:
        warnings.warn(f"recipe memory not written ({path}: {e.strerror or e})", stacklevel=2)


def load(path: Path | None = None) -> list[dict[str, Any]]:
    """Every readable row (a line cut short by a crash is skipped)."""
    path = path or memory_path()
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _task_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """How far apart two tasks are: label count, text length and shots on log scales, teacher kind."""
    def log_gap(k: str) -> float:
        x, y = a.get(k), b.get(k)
        if x and y:
            return abs(math.log(x / y))
        return 1.0 if x or y else 0.0  # known on one side only

    return (log_gap("labels") + log_gap("text_length") + 0.5 * log_gap("shots")
            + 0.5 * log_gap("teacher_parameters") + (a.get("teacher_type") != b.get("teacher_type")))


def _recipe_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    return (4 * abs(a["layer_fraction"] - b["layer_fraction"]) + 2 * abs(a["prune"] - b["prune"])
            + 0.25 * (a["embedding_bits"] != b["embedding_bits"])
            + 0.25 * (a.get("layer_choice", "spaced") != b.get("layer_choice", "spaced"))
            + 0.5 * abs(math.log2(a.get("steps_scale", 1.0) / b.get("steps_scale", 1.0))))


def predict_retention(rows: list[dict[str, Any]], task: dict[str, Any], recipe: dict[str, Any],
                      prior: float, k: int = 5) -> tuple[float, int]:
    """Retention a recipe is expected to keep on ``task``: the ``k`` nearest rows of the same kind
    of task (inverse-distance weighted; a row's measured retention where it has one, else its
    estimate) with ``prior`` as one more row at :data:`PRIOR_DISTANCE`; and how many rows it used."""
    scored = []
    for r in rows:
        y = r.get("retention") if r.get("retention") is not None else r.get("retention_estimate")
        if r.get("task") != task.get("task") or y is None or "recipe" not in r:
            continue
        scored.append((_task_distance(task, r) + _recipe_distance(recipe, r["recipe"]), y))
    scored.sort(key=lambda t: t[0])
    near = scored[:k]
    pts = near + [(PRIOR_DISTANCE, prior)]
    w = [1.0 / (d + 0.05) for d, _ in pts]
    return sum(wi * y for wi, (_, y) in zip(w, pts)) / sum(w), len(near)
