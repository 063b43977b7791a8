"""Terminal output: progress bars per stage and the closing summary table (rich, on stderr)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .report import metric_names, table_rows

console = Console(stderr=True)


class ProgressUI:
    """One bar per pipeline stage; ``update`` matches :data:`fscompile.pipeline.Progress`."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tasks: dict[str, TaskID] = {}
        self.progress = Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                                 disable=not enabled)

    def __enter__(self) -> ProgressUI:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, detail=detail)
        self.progress.update(self.tasks[stage], completed=done, total=total, detail=detail)


def print_summary(m: dict[str, Any]) -> None:
    out = Console()
    out.width = max(out.width, 132)  # a pipe or CI log is 80 wide by default: too narrow for this table
    table = Table(title=f"{m['config']['teacher']} → {m['target']['name']}  ({m['out_dir']})")
    for col in ("model", *metric_names(m), "agree", "MB", "× smaller", "b1 p50 ms", "b1 p99 ms",
                "b8 p50 ms", "× faster", "peak MB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in table_rows(m):
        table.add_row(r["model"].replace(" (PyTorch fp32)", " (torch fp32)"), f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                      "—" if r["agreement"] is None else f"{r['agreement']:.3f}", f"{r['size_mb']:.1f}",
                      f"{r['compression']:.1f}", f"{r['b1_p50']:.1f}", f"{r['b1_p99']:.1f}", f"{r['b8_p50']:.1f}",
                      f"{r['speedup']:.2f}", f"{r['peak_mb']:.0f}")
    out.print(table)
    out.print(f"compiled in {m['timings_s']['total']:.0f} s; report: {m['out_dir']}/report.md")
