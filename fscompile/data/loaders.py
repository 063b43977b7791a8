"""Read a data spec into named splits of rows (dicts of column -> value)."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from ..errors import InputError

Rows = list[dict[str, Any]]
BUILTIN_DIR = Path(__file__).parent / "builtin"
FILE_EXTS = (".tsv", ".csv", ".jsonl", ".json")
SPLIT_ALIASES = {
    "train": "train",
    "dev": "dev",
    "validation": "dev",
    "valid": "dev",
    "val": "dev",
    "test": "test",
}
# Names that mark the first row of a delimited file as a header.
KNOWN_COLUMNS = {
    "text", "sentence", "sentence1", "sentence2", "question", "question1", "question2",
    "premise", "hypothesis", "label", "labels", "review", "content", "document", "title",
    "description", "class", "target", "category", "idx", "index", "id",
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def load_splits(spec: str | None) -> tuple[dict[str, Rows], dict[str, Any]]:
    """Return ``({split: rows}, info)`` for a data spec.

    ``None`` is the embedded default; an existing path is a file or a directory of
    ``train``/``dev``/``test`` files; anything else is a Hugging Face dataset name
    (``glue/sst2``, ``imdb``).
    """
    if spec is None:
        return _load_dir(BUILTIN_DIR), {"source": "embedded:reviews"}
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_dir(path), {"source": str(path.resolve())}
    if path.is_file():
        return {"train": read_table(path)}, {"source": str(path.resolve())}
    if path.suffix.lower() in FILE_EXTS or spec.startswith((".", "/", "~")):
        raise InputError(f"data file not found: {spec}")
    return _load_hub(spec)


def _load_dir(path: Path) -> dict[str, Rows]:
    splits: dict[str, Rows] = {}
    for f in sorted(path.iterdir()):
        if f.suffix.lower() not in FILE_EXTS or not f.is_file():
            continue
        stem = f.stem.lower()
        for prefix, split in SPLIT_ALIASES.items():
            # "train_subset_8000.csv" is a train split; "dev.tsv" a dev split.
            if (stem == prefix or stem.startswith(prefix + "_") or stem.startswith(prefix + "-")) \
                    and split not in splits:
                splits[split] = read_table(f)
                break
    if not splits:
        raise InputError(f"no train/dev/test .tsv/.csv/.jsonl files in directory {path}")
    return splits


def read_table(path: Path) -> Rows:
    """Read a .tsv/.csv/.jsonl/.json file into rows; one-line errors on bad files."""
    ext = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    # spreadsheet exports: UTF-8 with a byte-order mark, or UTF-16 ("Unicode text") marked by one
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}): re-encode it as UTF-8") from None
    if not text.strip():
        raise InputError(f"data file is empty: {path}")
    if ext == ".jsonl":
        rows = []
        # split on "\n" only: JSON strings may hold U+2028 and other characters splitlines() breaks on
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
        return rows
    if ext == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise InputError(f"{path}: expected a JSON list of objects")
        return obj
    if ext in (".tsv", ".csv"):
        return _read_delimited(text, ext, path)
    raise InputError(f"unsupported data file type {ext!r} ({path}); use .tsv, .csv, .jsonl or .json")


def _read_delimited(text: str, ext: str, path: Path) -> Rows:
    # GLUE TSVs contain bare quotes inside sentences: QUOTE_NONE reads them verbatim. A stream, not
    # str.splitlines(): that splits inside quoted fields (gluing "one\ntwo" into "onetwo") and on
    # control characters such as \x0b or U+2028 that real text carries.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv" else ",",
                        quoting=csv.QUOTE_NONE if ext == ".tsv" else csv.QUOTE_MINIMAL)
    try:
        lines = []
        for r in reader:
            if r:
                lines.append((reader.line_num, r))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed {ext[1:].upper()} ({e})") from None
    if not lines:
        raise InputError(f"data file is empty: {path}")
    first = [c.strip() for c in lines[0][1]]
    if _looks_like_header(first):
        header, body = first, lines[1:]
    else:
        header, body = [f"column{i}" for i in range(len(first))], lines
    width = len(header)
    rows = []
    for n, r in body:
        if len(r) != width:
            raise InputError(f"{path}:{n}: expected {width} fields, found {len(r)}")
        rows.append(dict(zip(header, r)))
    if not rows:
        raise InputError(f"data file has a header but no rows: {path}")
    return rows


def _looks_like_header(fields: list[str]) -> bool:
    if any(f.lower() in KNOWN_COLUMNS for f in fields):
        return True
    return all(_IDENT.match(f) for f in fields) and len(set(fields)) == len(fields)


def _load_hub(spec: str) -> tuple[dict[str, Rows], dict[str, Any]]:
    """Load a Hugging Face dataset: ``name``, ``name/config`` (``glue/sst2``), ``owner/name``
    (``stanfordnlp/imdb``) or ``owner/name/config`` (``Salesforce/wikitext/wikitext-2-raw-v1``)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        raise InputError("the 'datasets' package is needed for Hub datasets") from None
    parts = spec.split("/")
    # two parts are either a dataset and its config or a repository id: try them in that order
    if len(parts) == 2:
        attempts = [tuple(parts), (spec,)]
    elif len(parts) == 3:
        attempts = [("/".join(parts[:2]), parts[2])]
    else:
        attempts = [(spec,)]
    first: Exception | None = None
    for args in attempts:
        try:
            ds = datasets.load_dataset(*args)
            break
        except Exception as e:  # datasets raises many types for "not found / offline"
            first = first or e
    else:
        msg = str(first).splitlines()[0] if str(first) else type(first).__name__
        raise InputError(f"cannot load dataset {spec!r} (not a local path, and the Hugging Face Hub "
                         f"failed: {msg[:200]})") from None
    splits: dict[str, Rows] = {}
    info: dict[str, Any] = {"source": f"hub:{spec}"}
    for split_name, part in ds.items():
        split = SPLIT_ALIASES.get(split_name, split_name)
        splits[split] = part.to_list()
        for col, feat in part.features.items():
            names = getattr(feat, "names", None)
            if names:
                info.setdefault("class_names", {})[col] = list(names)
    return splits, info
