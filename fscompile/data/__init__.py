"""Task data: splits, column detection, labels and the seeded few-shot sampler."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .loaders import Rows, load_splits

LABEL_COLUMNS = ("label", "labels", "class", "target", "category", "y")
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "description", "comment",
                "body", "tweet", "utterance")
PAIR_COLUMNS = (("question", "sentence"), ("sentence1", "sentence2"), ("premise", "hypothesis"),
                ("question1", "question2"), ("question", "passage"), ("text", "text_pair"))
ID_COLUMNS = {"idx", "index", "id"}


@dataclass(frozen=True)
class Example:
    """One labelled input: a text or a text pair, and a class index."""

    text: str
    label: int
    text_pair: str | None = None


@dataclass
class TaskData:
    """The few shots, the evaluation split and what they came from (rows are ``Example``s for
    text classification, ``ImageExample``s or ``QAExample``s for the other tasks)."""

    label_names: list[str]
    shots: list[Any]
    eval: list[Any]
    shot_split: str
    shot_indices: list[int]
    eval_split: str
    source: str
    columns: dict[str, str | None]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.columns.get("text_pair") is not None


def detect_columns(rows: Rows, text: str | None = None, pair: str | None = None,
                   label: str | None = None) -> dict[str, str | None]:
    """Find the text, optional text-pair and label columns; overrides win."""
    cols = list(rows[0].keys())
    for name, given in (("--text-column", text), ("--text-pair-column", pair),
                        ("--label-column", label)):
        if given is not None and given not in cols:
            raise InputError(f"{name} {given!r} is not a column; columns are: {', '.join(cols)}")
    if label is None:
        label = next((c for c in LABEL_COLUMNS if c in cols), None) or _guess_label(rows, cols)
    if label is None:
        raise InputError(f"no label column found (columns: {', '.join(cols)}); "
                         "name it with --label-column")
    if text is None:
        for a, b in PAIR_COLUMNS:
            if a in cols and b in cols and pair is None:
                text, pair = a, b
                break
    if text is None:
        text = next((c for c in TEXT_COLUMNS if c in cols), None) or _guess_text(rows, cols, label)
    if text is None:
        raise InputError(f"no text column found (columns: {', '.join(cols)}); "
                         "name it with --text-column")
    return {"text": text, "text_pair": pair, "label": label}


def _guess_label(rows: Rows, cols: list[str]) -> str | None:
    # A label column has few distinct short values; prefer the leftmost such column.
    sample = rows[:2000]
    for c in cols:
        if c.lower() in ID_COLUMNS:
            continue
        values = {str(r.get(c, "")) for r in sample}
        if 2 <= len(values) <= min(100, max(2, len(sample) // 5)) and max(map(len, values)) <= 40:
            return c
    return None


def _guess_text(rows: Rows, cols: list[str], label: str) -> str | None:
    sample = rows[:2000]
    best, best_len = None, 0.0
    for c in cols:
        if c == label or c.lower() in ID_COLUMNS:
            continue
        lengths = [len(v) for r in sample if isinstance(v := r.get(c), str)]
        mean = sum(lengths) / max(1, len(lengths))
        if len(lengths) == len(sample) and mean > best_len:
            best, best_len = c, mean
    return best


def _normalise_label(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        v = value.strip()
        return int(v) if v.lstrip("-").isdecimal() else v
    return value


def _to_examples(rows: Rows, columns: dict[str, str | None], dropped: Counter) -> list[tuple[Any, str, str | None]]:
    """(raw label, text, pair) per labelled row; rows with an empty or missing text are skipped and
    counted in ``dropped`` (real exports carry a few; one should not sink the compile)."""
    out = []
    for r in rows:
        raw = _normalise_label(r.get(columns["label"]))
        if raw is None or raw == "" or raw == -1:  # unlabeled rows (e.g. GLUE test splits)
            continue
        t = r.get(columns["text"])
        p = r.get(columns["text_pair"]) if columns["text_pair"] else None
        if not isinstance(t, str) or not t.strip() or (columns["text_pair"] and not isinstance(p, str)):
            dropped["empty text"] += 1
            continue
        out.append((raw, t.strip(), p.strip() if p else None))
    return out


def _fold_labels(parsed: dict[str, list[tuple[Any, str, str | None]]]) -> dict[str, str]:
    """Labels that differ only by case ("Positive", "positive"): one class, spelled as most rows
    spell it. Returns {variant: spelling} for the report, and rewrites ``parsed`` in place."""
    counts = Counter(r for ex in parsed.values() for r, _, _ in ex if isinstance(r, str))
    spelling: dict[str, str] = {}
    for v, _ in counts.most_common():
        spelling.setdefault(v.casefold(), v)
    merged = {v: spelling[v.casefold()] for v in counts if spelling[v.casefold()] != v}
    if merged:
        for name, ex in parsed.items():
            parsed[name] = [(merged.get(r, r) if isinstance(r, str) else r, t, p) for r, t, p in ex]
    return merged


def sample_shots(labels: list[int], shots: int, seed: int, label_names: list[str]) -> list[int]:
    """Stratified, seeded draw of ``shots`` row indices per class (sorted)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    chosen: list[int] = []
    for c, name in enumerate(label_names):
        idx = np.flatnonzero(labels_arr == c)
        if len(idx) < shots:
            raise InputError(f"class {name!r} has {len(idx)} rows, fewer than --shots {shots}")
        chosen.extend(int(i) for i in rng.choice(idx, size=shots, replace=False))
    return sorted(chosen)


def load_task_data(spec: str | None, shots: int, seed: int = 0, *, text_column: str | None = None,
                   text_pair_column: str | None = None, label_column: str | None = None,
                   max_eval: int | None = None) -> TaskData:
    """Load a data spec and draw the few shots; the eval split never overlaps them."""
    splits, info = load_splits(spec)
    shot_split = "train" if "train" in splits else next(iter(splits))
    columns = detect_columns(splits[shot_split], text_column, text_pair_column, label_column)
    parsed = {}
    dropped: Counter = Counter()
    for name, rows in splits.items():
        missing = [c for c in columns.values() if c and rows and c not in rows[0]]
        if missing:
            if name == shot_split:
                raise InputError(f"split {name!r} lacks column(s) {missing}")
            continue
        ex = _to_examples(rows, columns, dropped)
        if ex:
            parsed[name] = ex
    if shot_split not in parsed:
        raise InputError(f"split {shot_split!r} of {info['source']} has no labelled rows with text")
    merged = _fold_labels(parsed)

    # Class order: names the dataset declares, else sorted raw values (ints numerically).
    raw_values = {r for ex in parsed.values() for r, _, _ in ex}
    declared = info.get("class_names", {}).get(columns["label"])
    if declared and all(isinstance(v, int) and 0 <= v < len(declared) for v in raw_values):
        classes = list(range(len(declared)))
        label_names = list(declared)
    else:
        classes = sorted(raw_values, key=lambda v: (isinstance(v, str), v))
        label_names = [str(v) for v in classes]
    if len(classes) < 2:
        raise InputError(f"the label column {columns['label']!r} has a single class; need at least 2")
    to_id = {v: i for i, v in enumerate(classes)}
    examples = {name: [Example(t, to_id[r], p) for r, t, p in ex] for name, ex in parsed.items()}

    pool = examples[shot_split]
    shot_idx = sample_shots([e.label for e in pool], shots, seed, label_names)
    eval_split = next((s for s in ("dev", "test") if s in examples and s != shot_split), None)
    if eval_split is None:  # one split only: evaluate on what the shots did not take
        taken = set(shot_idx)
        eval_ex = [e for i, e in enumerate(pool) if i not in taken]
        eval_split = f"{shot_split} (rows not drawn as shots)"
    else:
        eval_ex = examples[eval_split]
    shot_keys = {(pool[i].text, pool[i].text_pair) for i in shot_idx}
    kept = [e for e in eval_ex if (e.text, e.text_pair) not in shot_keys]  # a shot's copy would flatter the score
    dropped["evaluation rows repeating a shot"] += len(eval_ex) - len(kept)
    eval_ex = kept
    if not eval_ex:
        raise InputError("no rows left to evaluate on: add a dev split or more rows")
    if max_eval is not None and len(eval_ex) > max_eval:
        keep = np.sort(np.random.default_rng(seed).choice(len(eval_ex), max_eval, replace=False))
        eval_ex = [eval_ex[i] for i in keep]
    return TaskData(label_names=label_names, shots=[pool[i] for i in shot_idx], eval=eval_ex,
                    shot_split=shot_split, shot_indices=shot_idx, eval_split=eval_split,
                    source=info["source"], columns=columns,
                    info={**info, "dropped": {k: v for k, v in dropped.items() if v}, "labels_merged": merged})


def load_unlabeled(spec: str, exclude: Iterable[Example] = (), limit: int | None = None, seed: int = 0) -> list[str]:
    """Raw text for the transfer set, labels ignored: a .txt file (one text per line), or
    anything ``--data`` accepts (a table, a directory of splits, a Hub dataset such as
    ``imdb`` or ``Salesforce/wikitext/wikitext-2-raw-v1``), every split, from its text column. Out-of-domain
    text helps too: the teacher labels whatever it is shown. Texts of ``exclude`` (the evaluation
    rows and shots) and repeats are dropped, so the task's own data can serve as the pool without
    leaking the evaluation set; at most ``limit`` texts are kept (a seeded sample)."""
    from pathlib import Path

    p = Path(spec).expanduser()
    if p.suffix.lower() == ".txt" and p.is_file():
        try:
            texts = [ln.strip() for ln in p.read_text(encoding="utf-8").split("\n")]
        except UnicodeDecodeError:
            raise InputError(f"--unlabeled {spec} is not UTF-8 text") from None
    else:
        try:
            splits, _ = load_splits(spec)
        except InputError as e:
            raise InputError(f"--unlabeled: {e}") from None
        texts = []
        for rows in splits.values():
            if not rows:
                continue
            col = next((c for c in TEXT_COLUMNS if c in rows[0]), None) or _guess_text(rows, list(rows[0]), "")
            texts += [str(r.get(col) or "").strip() for r in rows] if col else []
    held = {t for e in exclude for t in (e.text, e.text_pair) if t}
    texts = [t for t in dict.fromkeys(texts) if t and t not in held]
    if not texts:
        raise InputError(f"--unlabeled {spec}: no text (or only the evaluation rows' and shots' texts)")
    if limit is not None and len(texts) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), limit, replace=False))
        texts = [texts[i] for i in keep]
    return texts


__all__ = ["Example", "TaskData", "load_task_data", "sample_shots", "detect_columns", "load_unlabeled"]
