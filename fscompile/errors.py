"""Typed errors, mapped to documented exit codes at the CLI edge."""
from __future__ import annotations


class FscompileError(Exception):
    """Base class: a problem the user can act on, shown as one line."""

    exit_code = 1


class InputError(FscompileError):
    """Bad model, data or option value (exit code 3)."""

    exit_code = 3


class TargetUnavailable(FscompileError):
    """The requested target cannot build or run on this machine (exit code 4)."""

    exit_code = 4


class StageError(FscompileError):
    """A pipeline stage failed for a reason other than bad input (exit code 5)."""

    exit_code = 5


class BudgetUnmet(FscompileError):
    """No recipe met the budget (--max-latency-ms, --min-retention, ...) (exit code 6). ``report``:
    every candidate with its figures and why it was dropped (what ``search.json`` holds on success)."""

    exit_code = 6

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class DeadlineExceeded(BaseException):
    """``--timeout`` reached (exit code 5). A BaseException, as KeyboardInterrupt is, so that the
    fallbacks that catch one failing quantizer or exporter (``except Exception``) cannot swallow it."""

    exit_code = 5


# click uses 2 for usage errors; 1 is kept for unexpected internal errors.
EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with the traceback from --debug)",
    2: "usage error (unknown option, bad option value)",
    3: "input error (model, data or output directory)",
    4: "target unavailable on this machine",
    5: "stage failure (export, quantization, profiling), or --timeout reached; nothing was written",
    6: "no recipe met the budget (--max-latency-ms, --max-size-mb, --max-peak-mb, --min-retention)",
    130: "interrupted (Ctrl-C); nothing was written",
}
