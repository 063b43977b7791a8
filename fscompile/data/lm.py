"""Text passages for causal language modelling: the shots are N passages (there are no
classes), the evaluation split is other passages, never the same ones.

Sources: a ``.txt`` file (paragraphs separated by blank lines; one passage per line when it
has none), a ``.csv/.tsv/.jsonl/.json`` table or a folder of ``train``/``dev``/``test`` files
(``.txt`` or tables)
(the text column found as for classification), or a Hugging Face dataset (``wikitext/wikitext-2-raw-v1``).
With a single split, half of its passages are held out for evaluation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from . import TEXT_COLUMNS, Example, TaskData, _guess_text
from .loaders import SPLIT_ALIASES, Rows, load_splits

MIN_CHARS = 20  # shorter lines (titles, "= Section =" headers, blanks) are not passages


def _passages_from_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    blocks = [" ".join(b.split()) for b in text.split("\n\n")]
    if len(blocks) < 2:  # no paragraphs: one passage per line
        blocks = [" ".join(line.split()) for line in text.splitlines()]
    return [b for b in blocks if len(b) >= MIN_CHARS]


def _passages_from_rows(rows: Rows, column: str | None, where: str) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    if column is not None and column not in cols:
        raise InputError(f"--text-column {column!r} is not a column of {where}; columns are: {', '.join(cols)}")
    col = column or next((c for c in TEXT_COLUMNS if c in cols), None) or _guess_text(rows, cols, "")
    if col is None:
        raise InputError(f"no text column in {where} (columns: {', '.join(cols)}); name one with --text-column")
    texts = [" ".join(str(r.get(col) or "").replace("\\", " ").split()) for r in rows]
    return [t for t in texts if len(t) >= MIN_CHARS]


def load_passage_splits(spec: str | None, column: str | None = None) -> tuple[dict[str, list[str]], str]:
    if spec is None:
        raise InputError("text generation needs --data: a .txt file of passages, a table with a text column, "
                         "a folder of train/dev files, or a Hub dataset")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".txt":
        return {"train": _passages_from_txt(p)}, str(p.resolve())
    if p.is_dir():  # train*.txt / dev*.txt / test*.txt (other .txt files, e.g. readme.txt, are not data)
        splits: dict[str, list[str]] = {}
        for f in sorted(p.glob("*.txt")):
            split = next((v for k, v in SPLIT_ALIASES.items() if f.stem.lower().startswith(k)), None)
            if split is not None:
                splits.setdefault(split, []).extend(_passages_from_txt(f))
        if splits:
            return splits, str(p.resolve())
    rows, info = load_splits(spec)
    return {s: _passages_from_rows(r, column, f"{spec} [{s}]") for s, r in rows.items()}, info["source"]


def load_lm_task(spec: str | None, shots: int, seed: int = 0, max_eval: int | None = None,
                 text_column: str | None = None, holdout: float = 0.5) -> TaskData:
    """``shots`` passages drawn with ``seed`` from the training split; evaluation passages from
    dev/test, else from a held-out share of the one split (disjoint from the shots)."""
    splits, source = load_passage_splits(spec, text_column)
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        raise InputError(f"{source}: no passages of at least {MIN_CHARS} characters")
    shot_split = "train" if "train" in splits else next(iter(splits))
    pool = splits[shot_split]
    eval_split = next((s for s in ("dev", "test") if s in splits and s != shot_split), None)
    rng = np.random.default_rng(seed)
    if eval_split is None:
        order = rng.permutation(len(pool))
        cut = int(len(pool) * holdout)
        if cut < 1 or cut >= len(pool):
            raise InputError(f"{source}: {len(pool)} passage(s); need several to hold some out for evaluation")
        eval_rows, pool = [pool[i] for i in sorted(order[:cut])], [pool[i] for i in sorted(order[cut:])]
        eval_split = f"{shot_split} (held-out {holdout:.0%}, seed {seed})"
    else:
        eval_rows = splits[eval_split]
    if len(pool) < shots:
        raise InputError(f"{source}: {len(pool)} passages to draw from, fewer than --shots {shots}")
    idx = sorted(rng.choice(len(pool), size=shots, replace=False).tolist())
    if max_eval is not None and len(eval_rows) > max_eval:
        eval_rows = [eval_rows[i] for i in np.sort(rng.choice(len(eval_rows), max_eval, replace=False))]
    return TaskData(label_names=["text"], shots=[Example(pool[i], 0) for i in idx],
                    eval=[Example(t, 0) for t in eval_rows], shot_split=shot_split, shot_indices=idx,
                    eval_split=eval_split, source=source, columns={"text": text_column or "auto", "label": None})
