"""Target backends: a small protocol, discovered through the ``fscompile.backends`` entry points.

A third party adds a target by shipping a class implementing :class:`Backend` and declaring
it under ``[options.entry_points] fscompile.backends = my-target = pkg.module:MyBackend``.
"""
from __future__ import annotations

import abc
import difflib
import functools
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from ..config import Recipe
from ..errors import InputError, TargetUnavailable

GROUP = "fscompile.backends"


@dataclass
class Artifact:
    """What a backend built: the directory, its model file and how it was made."""

    path: Path
    model_file: str
    precision: str
    info: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """One deployment target. Class attributes declare capabilities; methods do the work."""

    name: ClassVar[str]
    device: ClassVar[str] = "cpu"
    precisions: ClassVar[tuple[str, ...]] = ()
    sparsity: ClassVar[tuple[str, ...]] = ()  # patterns this target accelerates
    calibration_methods: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """``(True, "")`` when the target builds and runs here, else ``(False, reason)``."""
        return True, ""

    def prepare(self, student: Any, recipe: Recipe) -> Any:
        """Apply the sparsity pattern this target exploits (default: none)."""
        return student

    @abc.abstractmethod
    def compile(self, student: Any, calibration: Any, out_dir: Path, recipe: Recipe) -> Artifact:
        """Build the deployable files into ``out_dir``."""

    @abc.abstractmethod
    def load(self, artifact: Artifact) -> Any:
        """A runner: ``runner(batch of int64 arrays) -> logits``."""


@functools.lru_cache(maxsize=1)
def _discover() -> tuple[dict[str, type[Backend]], dict[str, str]]:
    """Load every registered backend once; a broken plugin becomes a reason, not a crash."""
    found: dict[str, type[Backend]] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise TypeError(f"{ep.value} is not a fscompile Backend subclass")
        except Exception as e:  # a third-party plugin may fail in any way; report, don't crash
            broken[ep.name] = f"{type(e).__name__}: {e}"
            continue
        if ep.name in found and found[ep.name] is not cls:
            warnings.warn(f"two packages register target {ep.name!r}; keeping {found[ep.name].__module__}")
            continue
        found[ep.name] = cls
    return found, broken


def registered() -> dict[str, type[Backend]]:
    return dict(_discover()[0])


def broken_plugins() -> dict[str, str]:
    return dict(_discover()[1])


def refresh() -> None:
    """Forget cached discovery (after installing a plugin in the same process)."""
    _discover.cache_clear()


def get_backend(name: str) -> Backend:
    """The backend for ``name``; unknown names list what is installed and close matches."""
    backends = registered()
    if name not in backends:
        if name in broken_plugins():
            raise TargetUnavailable(f"target {name!r} failed to load: {broken_plugins()[name]}")
        close = difflib.get_close_matches(name, backends, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"unknown target {name!r}; installed: {', '.join(sorted(backends))}.{hint}")
    return backends[name]()


def describe(name: str, cls: type[Backend]) -> dict[str, Any]:
    ok, why = cls.available()
    return {"name": name, "available": ok, "reason": why, "device": cls.device,
            "precisions": list(cls.precisions), "sparsity": list(cls.sparsity),
            "calibration": list(cls.calibration_methods), "description": cls.description,
            "module": cls.__module__}


__all__ = ["Artifact", "Backend", "Recipe", "get_backend", "registered", "broken_plugins", "describe",
           "refresh"]
