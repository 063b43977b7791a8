"""Accuracy, macro-F1 and agreement with the teacher, for any runner."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .data import Example
from .data.batching import length_sorted_batches, pad_batch

# A runner maps a batch of int64 arrays (input_ids, attention_mask, ...) to logits.
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def predict(runner: Runner, tokenizer, input_names: list[str], examples: list[Example],
            max_length: int = 128, batch_size: int = 32) -> np.ndarray:
    """Logits for ``examples``, batched by length so padding stays small."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    pad = tokenizer.pad_token_id or 0
    out: np.ndarray | None = None
    for idx in length_sorted_batches(enc, batch_size):
        logits = np.asarray(runner(pad_batch(enc, idx, input_names, pad)), dtype=np.float32)
        if out is None:
            out = np.empty((len(examples), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    assert out is not None
    return out


def metrics(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """accuracy, macro-F1 and (given the teacher's predictions) agreement."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(-1)
    out = {"accuracy": float(accuracy_score(labels, pred)),
           "macro_f1": float(f1_score(labels, pred, average="macro")),
           "n": int(len(labels))}
    if reference is not None:
        out["agreement"] = float((pred == reference).mean())
    return out
