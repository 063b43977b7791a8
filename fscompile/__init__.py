"""fscompile: few-shot distillation of a teacher into a small student, compiled for a target."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

__version__ = version("fscompile")


def compile(teacher: str = "minilm", *, data: str | None = None, target: str = "ort-int8", shots: int = 10,
            out: str | Path | None = None, force: bool = False, progress=None, **options: Any) -> dict[str, Any]:
    """Compile ``teacher`` for ``target`` from ``shots`` labelled examples per class.

    ``options`` are :class:`~fscompile.config.CompileConfig` fields (``seed``, ``student_layers``,
    ``prune``, ...) or :class:`~fscompile.config.DistillConfig` fields (``steps``, ``lr``, ...).
    Returns the manifest; the artifact, ``manifest.json`` and ``report.md`` are in ``out``.
    """
    import dataclasses

    from .config import CompileConfig, DistillConfig
    from .pipeline import run

    distill_fields = {f.name for f in dataclasses.fields(DistillConfig)}
    dist = DistillConfig(**{k: v for k, v in options.items() if k in distill_fields})
    cfg = CompileConfig(teacher=teacher, data=data, target=target, shots=shots, distill=dist,
                        **{k: v for k, v in options.items() if k not in distill_fields})
    out = Path(out) if out is not None else Path("fscompile-out") / cfg.run_name()
    return run(cfg, out, force=force, progress=progress)


__all__ = ["compile", "__version__"]
