"""Tiny BERT models and data built on the spot, so the core tests need nothing from ../shared."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FSCOMPILE_SHARED", REPO.parent / "shared"))
WORDS = sorted({w.strip(".,;'").lower() for line in (REPO / "fscompile/data/builtin/train.jsonl").read_text().splitlines()
                for w in json.loads(line)["text"].split()} |
               {w.strip(".,;'").lower() for line in (REPO / "fscompile/data/builtin/dev.jsonl").read_text().splitlines()
                for w in json.loads(line)["text"].split()})

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tokenizer(path: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *list("abcdefghijklmnopqrstuvwxyz0123456789.,;'!?-"), *WORDS]
    vocab = list(dict.fromkeys(w for w in vocab if w))
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert len(tok) == len(vocab)
    return tok


def _config(vocab_size: int, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=160, **kw)


def _classifier(tmp_path_factory, name: str, seed: int, **kw) -> Path:
    """A tiny BertForSequenceClassification with labels negative/positive and random weights, saved."""
    import torch
    from transformers import BertForSequenceClassification

    path = tmp_path_factory.mktemp(name)
    tok = _tokenizer(path)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_config(len(tok), num_labels=2, id2label={0: "negative", 1: "positive"},
                                                  label2id={"negative": 0, "positive": 1}, **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny classifier, random weights (it gives every row of the built-in dev set one class)."""
    return _classifier(tmp_path_factory, "tiny-teacher", 0)


@pytest.fixture(scope="session")
def tiny_opinionated(tmp_path_factory) -> Path:
    """A tiny classifier whose random weights are drawn wide enough (std 0.5, seed 1) that it splits the
    built-in dev set 55 / 45: a student trained for a few steps cannot copy it."""
    return _classifier(tmp_path_factory, "tiny-opinionated", 1, initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_headless(tmp_path_factory) -> Path:
    """A tiny BertModel without a task head (like a sentence-transformers body)."""
    import torch
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-headless")
    tok = _tokenizer(path)
    torch.manual_seed(1)
    BertModel(_config(len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set FSCOMPILE_SHARED)")
    return SHARED


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Checkpoints of the tests go to a temporary cache, never the user's."""
    monkeypatch.setenv("FSCOMPILE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
