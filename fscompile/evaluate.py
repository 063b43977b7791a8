"""Accuracy, macro-F1 and agreement with the teacher, for any runner."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .data import Example, TaskData
from .data.batching import length_sorted_batches, pad_batch
from .models.text import TextModel

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


def metrics(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None,
            probabilities: np.ndarray | None = None) -> dict[str, float]:
    """accuracy, macro-F1 and, given the teacher's predictions (or its logits), agreement; with
    its logits also the retention estimated without labels (:func:`retention_estimate`) from the
    teacher's ``probabilities`` (None: its logits :func:`softened`)."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(-1)
    out = {"accuracy": float(accuracy_score(labels, pred)),
           "macro_f1": float(f1_score(labels, pred, average="macro")),
           "n": int(len(labels))}
    if reference is not None:
        ref = reference.argmax(-1) if reference.ndim == 2 else reference
        out["agreement"] = float((pred == ref).mean())
        if reference.ndim == 2:
            p = softened(reference) if probabilities is None else probabilities
            out["retention_estimate"] = retention_estimate(p, pred, ref)
            out["retention_estimate_sd"] = retention_sampling_sd(p, pred, ref)
            # the logits softened at fixed temperatures, so benchmarks can compare them with the default
            out["retention_estimates"] = {str(t): retention_estimate(softened(reference, t), pred, ref)
                                          for t in (1.0, 1.5, 2.0, 3.0)}
    return out


# For a teacher that comes with its head and has no dropout (its probabilities are otherwise read with dropout
# on: dropout_probabilities). Fine-tuned classifiers are over-confident (Guo et al., 2017); a head fitted here
# on the shots is calibrated on them instead (fit_temperature). On 9 builds (SST-2 and AG News, 2-3 layers;
# benchmarks/results/README.md, "Compile to a budget"), the estimate's mean error at T = 1 / 1.5 / 2 / 3 was
# -0.5 / +0.2 / +0.7 / +1.4 points, within 1.5 points on 78% / 89% / 100% / 44% of them (in-sample, two tasks).
# Not fitted on the shots: a teacher fine-tuned on the pairs they are drawn from is over-confident on them
# (QNLI: 1.10 over 30 shot draws, 1.50 on the labelled dev split), and the estimate then missed by 1.5+ points
# on 93-100% of draws; even at 1.50 it underestimated every QNLI build, by up to 5.4 points
# (benchmarks/retention_temperature.py).
RETENTION_TEMPERATURE = 2.0


def softened(teacher_logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """The teacher's softmax at ``temperature`` (None: :data:`RETENTION_TEMPERATURE`), read as the
    chance each class is right."""
    from scipy.special import softmax

    return softmax(teacher_logits / (temperature or RETENTION_TEMPERATURE), axis=-1)


def dropout_probabilities(teacher: TextModel, examples: list[Example], logits: np.ndarray, max_length: int = 128,
                          temperature: float | None = None) -> np.ndarray:
    """The teacher's probabilities for the label-free estimate: its softmax (at ``temperature``, None: 1, its
    own head's) in one pass with its dropout on (Gal and Ghahramani, 2016), seeded. One pass is enough: the
    estimate is a mean over rows, where dropout's noise averages out. Dropout lowers the teacher's confidence
    most on the rows it is fragile on, which is where students disagree with it; a temperature lowers it
    everywhere alike. On the 22 distinct builds of SST-2, AG News and QNLI that budget runs kept, it landed
    within 1.5 points on 20 (19 at T=2) and took the worst error from 3.9 to 2.2 points, with no fitted constant
    (benchmarks/retention_temperature.py). A teacher without dropout (its outputs unchanged, ``logits``):
    ``logits`` :func:`softened` as before."""
    module = teacher.module
    was_training = module.training
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
            torch.manual_seed(0)
            module.train()
            noisy = predict(torch_runner(teacher), teacher.tokenizer, teacher.input_names, examples, max_length)
    finally:
        module.train(was_training)
    if np.allclose(noisy, logits, atol=1e-5):
        return softened(logits, temperature)
    return softened(noisy, temperature or 1.0)


def retention_estimate(probabilities: np.ndarray, pred: np.ndarray, teacher_pred: np.ndarray | None = None) -> float:
    """Accuracy over the teacher's, estimated without labels: read the teacher's ``probabilities`` as
    the chance each class is right, so a model's expected accuracy is the mean probability the teacher
    gives its answers (the teacher's own: the mean it gives its answers, ``teacher_pred``, None: its top
    probability). A disagreement where the teacher hesitated costs little; one where it was sure costs a
    whole point."""
    rows = np.arange(len(pred))
    top = probabilities.argmax(-1) if teacher_pred is None else teacher_pred
    teacher = float(probabilities[rows, top].mean())
    return min(1.0, float(probabilities[rows, pred].mean()) / teacher) if teacher > 0 else 0.0


def retention_sampling_sd(probabilities: np.ndarray, pred: np.ndarray, teacher_pred: np.ndarray | None = None,
                          draws: int = 200) -> float:
    """How far measured retention on these rows strays from the estimate by chance alone: labels drawn
    from the same probabilities the estimate reads, retention measured on each draw, its spread.
    On 1,000 rows it was 0.8-1.2 points for students agreeing 86-94% with the teacher, ~2 at 55%: a
    label-free estimate cannot be judged finer than that on so few rows."""
    cum = probabilities.cumsum(-1)
    top = probabilities.argmax(-1) if teacher_pred is None else teacher_pred
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(draws):
        labels = (rng.random((len(pred), 1)) > cum).sum(-1)
        right = (top == labels).mean()
        if right > 0:
            kept.append((pred == labels).mean() / right)
    return float(np.std(kept)) if kept else 0.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that calibrates held-out ``logits`` on their ``labels``: least cross-entropy
    against the labels smoothed by Laplace's rule (1/(n+2) spread over the other classes), so that
    a few shots all predicted right still leave room for error instead of driving it to zero."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    n, k = logits.shape
    eps = 1.0 / (n + 2)
    target = np.full(logits.shape, eps / (k - 1))
    target[np.arange(n), labels] = 1.0 - eps

    def loss(log_t: float) -> float:
        return float(-(target * log_softmax(logits / np.exp(log_t), axis=-1)).sum(-1).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def held_out_temperature(estimator, x: np.ndarray, y: np.ndarray, cv, groups: np.ndarray | None = None,
                         rows: slice = slice(None)) -> float:
    """:func:`fit_temperature` on ``estimator``'s decision values for ``x[rows]``, each predicted by a
    fit without its fold (``cv``, folds by ``groups`` if given)."""
    from sklearn.model_selection import cross_val_predict

    held = cross_val_predict(estimator, x, y, groups=groups, cv=cv, method="decision_function")[rows]
    return fit_temperature(held if held.ndim == 2 else two_logits(held[:, None], 1), y[rows])


def two_logits(one: np.ndarray, axis: int) -> np.ndarray:
    """sklearn's binary linear model keeps one score (one row of weights); split it symmetrically into
    two classes' logits, whose softmax is the sigmoid of the score."""
    return np.concatenate([-one / 2, one / 2], axis)


def linear_head(clf) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of a fitted sklearn linear classifier as a head of one logit per class: copied
    as is, a binary model's one row would fill both logits alike."""
    w, b = clf.coef_, clf.intercept_
    return (two_logits(w, 0), two_logits(b, 0)) if w.shape[0] == 1 else (w, b)


def torch_runner(model: TextModel):
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model.module(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()
    return run


def evaluate_all(task: TaskData, teacher_logits: np.ndarray, probabilities: np.ndarray, student: TextModel,
                 artifact_runner, max_length: int) -> dict[str, dict[str, float]]:
    """Accuracy, macro-F1, agreement with the teacher (its ``teacher_logits``) and retention estimated from
    its ``probabilities`` (:func:`dropout_probabilities`), on the eval split."""
    labels = np.array([e.label for e in task.eval])
    names = student.input_names
    t = teacher_logits
    out = {"teacher": metrics(t, labels, t, probabilities)}
    out["student"] = metrics(predict(torch_runner(student), student.tokenizer, names, task.eval, max_length),
                             labels, t, probabilities)
    out["artifact"] = metrics(predict(artifact_runner, student.tokenizer, names, task.eval, max_length),
                              labels, t, probabilities)
    return out


def real_seq_len(task: TaskData, model: TextModel, max_length: int) -> int:
    """The median tokenised length of the evaluation inputs: latency at the data's real size."""
    sample = task.eval[:512]
    enc = model.tokenizer([e.text for e in sample], [e.text_pair or "" for e in sample] if task.is_pair else None,
                          truncation=True, max_length=max_length)
    return int(np.median([len(x) for x in enc["input_ids"]]))
