"""Extractive QA data (SQuAD 1.1 / 2.0 format): files, folders of them, Hub datasets.

Shots are drawn per *kind* of question (answerable / unanswerable, the two classes SQuAD 2.0
has), so ``--shots 10`` gives ten of each where the data has both. With a single file, whole
articles are held out for evaluation so no context is shared between shots and evaluation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import TaskData, sample_shots


@dataclass(frozen=True)
class QAExample:
    """One question on one context; ``answers`` empty for an unanswerable question."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    starts: tuple[int, ...]
    title: str = ""

    @property
    def label(self) -> int:  # the sampling class: 0 answerable, 1 unanswerable
        return 0 if self.answers else 1


# A QA task is a TaskData whose shots and evaluation rows are QAExamples.
QATaskData = TaskData


def _from_squad_json(path: Path) -> list[QAExample]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a SQuAD JSON file ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise InputError(f"{path}: not in SQuAD format (expected a top-level 'data' list)")
    out = []
    for article in raw["data"]:
        for para in article.get("paragraphs", []):
            context = para.get("context", "")
            for qa in para.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                if not isinstance(qa.get("question"), str) or not context:
                    raise InputError(f"{path}: question {qa.get('id')!r} lacks a question or context")
                out.append(QAExample(str(qa.get("id", len(out))), qa["question"].strip(), context,
                                     tuple(a["text"] for a in answers), tuple(int(a["answer_start"]) for a in answers),
                                     article.get("title", "")))
    return out


def _from_hub(name: str) -> dict[str, list[QAExample]]:
    try:
        import datasets

        ds = datasets.load_dataset(name)
    except Exception as e:  # the Hub client raises many types; one line for the user
        raise InputError(f"cannot load QA dataset {name!r} (not a local path, and the Hugging Face Hub failed: "
                         f"{str(e).splitlines()[0][:200]})") from None
    out = {}
    for split, d in ds.items():
        need = {"question", "context", "answers"}
        if not need <= set(d.column_names):
            raise InputError(f"{name} [{split}]: needs columns {sorted(need)}, has {d.column_names}")
        out["dev" if split == "validation" else split] = [
            QAExample(str(r.get("id", i)), r["question"].strip(), r["context"], tuple(r["answers"]["text"]),
                      tuple(r["answers"]["answer_start"]), r.get("title", "")) for i, r in enumerate(d)]
    return out


def load_qa_splits(spec: str) -> tuple[dict[str, list[QAExample]], str]:
    p = Path(spec).expanduser()
    if p.is_file():
        return {"all": _from_squad_json(p)}, str(p)
    if p.is_dir():
        splits = {}
        for f in sorted(p.glob("*.json")):
            name = f.name.lower()
            split = "train" if name.startswith("train") else "dev" if name.startswith(("dev", "val")) else "all"
            splits.setdefault(split, []).extend(_from_squad_json(f))
        if not splits:
            raise InputError(f"{p}: no SQuAD .json files")
        return splits, str(p)
    if spec.startswith((".", "/", "~")):
        raise InputError(f"QA data {spec!r} does not exist")
    return _from_hub(spec), spec


def load_qa_task(spec: str | None, shots: int, seed: int = 0, max_eval: int | None = None,
                 holdout: float = 0.5) -> QATaskData:
    """Draw ``shots`` questions per kind (answerable / unanswerable where both exist)."""
    if spec is None:
        raise InputError("question answering needs --data (a SQuAD-format .json file or folder, or a Hub dataset)")
    splits, source = load_qa_splits(spec)
    shot_split = "train" if "train" in splits else next(iter(splits))
    pool = splits[shot_split]
    eval_split = next((s for s in ("dev", "test") if s in splits and s != shot_split), None)
    rng = np.random.default_rng(seed)
    if eval_split is None:  # one file: hold out whole articles (contexts never shared)
        titles = sorted({e.title or e.context[:80] for e in pool})
        held = set(rng.permutation(titles)[: max(1, int(len(titles) * holdout))].tolist())
        if len(held) == len(titles):
            raise InputError(f"{source}: a single article; need several to hold some out for evaluation")
        eval_rows = [e for e in pool if (e.title or e.context[:80]) in held]
        pool = [e for e in pool if (e.title or e.context[:80]) not in held]
        eval_split = f"{shot_split} (held-out articles, {holdout:.0%}, seed {seed})"
    else:
        eval_rows = splits[eval_split]
    kinds = ["answerable", "unanswerable"] if any(not e.answers for e in pool) else ["answerable"]
    labels = [e.label for e in pool]
    if len(kinds) == 1:
        idx = sorted(rng.choice(len(pool), size=min(shots, len(pool)), replace=False).tolist())
        if len(pool) < shots:
            raise InputError(f"{source}: {len(pool)} questions, fewer than --shots {shots}")
    else:
        idx = sample_shots(labels, shots, seed, kinds)
    if max_eval is not None and len(eval_rows) > max_eval:
        keep = np.sort(rng.choice(len(eval_rows), max_eval, replace=False))
        eval_rows = [eval_rows[i] for i in keep]
    if not eval_rows:
        raise InputError("no questions left to evaluate on")
    return QATaskData(label_names=kinds, shots=[pool[i] for i in idx], eval=eval_rows, shot_split=shot_split,
                      shot_indices=idx, eval_split=eval_split, source=source,
                      columns={"text": "question", "text_pair": "context", "label": "answers"})


def load_unlabeled_qa(spec: str, exclude: list[QAExample] = ()) -> list[tuple[str, str]]:
    """(question, context) pairs for the transfer set from anything ``--data`` accepts; answers
    are ignored (the teacher labels them). Questions on a context in ``exclude`` (the evaluation
    rows) are dropped, so the same file can serve as data and as the unlabeled pool."""
    splits, source = load_qa_splits(spec)
    held = {e.context for e in exclude}
    seen: set[tuple[str, str]] = set()
    out = []
    for rows in splits.values():
        for e in rows:
            if e.context not in held and (e.question, e.context) not in seen:
                seen.add((e.question, e.context))
                out.append((e.question, e.context))
    if not out:
        raise InputError(f"--unlabeled {source}: no questions outside the evaluation contexts")
    return out

