"""What the benchmark scripts share: where the repository and ../shared are, and a results log."""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FSCOMPILE_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Results:
    """Rows kept in memory and appended to ``out/results.jsonl`` as they come (a crash keeps them)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def record(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
