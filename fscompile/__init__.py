"""fscompile: few-shot distillation of a teacher into a small student, compiled for a target."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

__version__ = version("fscompile")


def compile(teacher: Any = "minilm", *, data: str | None = None, target: str = "ort-int8", shots: int = 10,
            out: str | Path | None = None, force: bool = False, progress=None, tokenizer: Any = None,
            processor: Any = None, **options: Any) -> dict[str, Any]:
    """Compile ``teacher`` for ``target`` from ``shots`` labelled examples per class.

    ``teacher`` is a name, a path, or an object: a transformers model with its ``tokenizer`` (or,
    for images, its image ``processor``), or any ``torch.nn.Module`` image classifier (give
    ``image_size``, ``mean`` and ``std`` unless ImageNet's normalisation and the data's size fit).
    ``options`` are :class:`~fscompile.config.CompileConfig` fields (``seed``, ``student_layers``,
    ``prune``, ...), :class:`~fscompile.config.DistillConfig` fields (``steps``, ``lr``, ...), or
    :class:`~fscompile.budget.Budget` fields (``max_latency_ms``, ``min_retention``, ...; with
    ``max_trials``), which search for the fastest artifact within them (of those within 5% of it, the most accurate).
    Returns the manifest; the artifact, ``manifest.json`` and ``report.md`` are in ``out``.
    """
    import dataclasses

    from .budget import Budget
    from .config import CompileConfig, DistillConfig
    from .search import compile_or_search

    if not isinstance(teacher, (str, Path)):
        from .models.adopt import adopt_teacher

        teacher, implied = adopt_teacher(teacher, tokenizer, processor)
        options = {**implied, **options}
    teacher = str(teacher)

    budget = Budget.pop_from(options)
    max_trials = options.pop("max_trials", 3)
    distill_fields = {f.name for f in dataclasses.fields(DistillConfig)}
    dist = DistillConfig(**{k: v for k, v in options.items() if k in distill_fields})
    cfg = CompileConfig(teacher=teacher, data=data, target=target, shots=shots, distill=dist,
                        **{k: v for k, v in options.items() if k not in distill_fields})
    out = Path(out) if out is not None else Path("fscompile-out") / cfg.run_name()
    return compile_or_search(cfg, out, budget, force=force, progress=progress, max_trials=max_trials)


__all__ = ["compile", "__version__"]
