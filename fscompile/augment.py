"""Transfer-set augmentations: in-domain variants of the few shots for the teacher to label.

Labels are not the limit in few-shot distillation, inputs are: the teacher labels every
variant, so the student sees the teacher's function on many nearby inputs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .data import Example

OPS = ("mask", "drop", "swap", "mix", "crop", "vocab", "near")


@dataclass
class TransferSet:
    """Texts (and optional pairs) the teacher labels; ``origin`` says where each came from."""

    texts: list[str]
    pairs: list[str] | None
    origin: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def mask_words(words: list[str], rng: random.Random, mask: str, p: float = 0.15) -> list[str]:
    """Replace about ``p`` of the words by the mask token (at least one)."""
    out = [mask if rng.random() < p else w for w in words]
    if out == words and words:
        out[rng.randrange(len(words))] = mask
    return out


def drop_words(words: list[str], rng: random.Random, p: float = 0.2) -> list[str]:
    """Delete about ``p`` of the words, keeping at least one."""
    if not words:
        return words
    out = [w for w in words if rng.random() >= p]
    return out or [rng.choice(words)]


def swap_spans(words: list[str], rng: random.Random) -> list[str]:
    """Swap two short spans of words."""
    if len(words) < 4:
        return list(reversed(words))
    n = max(1, len(words) // 6)
    i = rng.randrange(0, len(words) - n)
    j = rng.randrange(0, len(words) - n)
    out = list(words)
    out[i:i + n], out[j:j + n] = words[j:j + n], words[i:i + n]
    return out


def fit_length(words: list[str], length: int, rng: random.Random) -> list[str]:
    """A random contiguous window of ``length`` words (all of them if there are fewer)."""
    if len(words) <= length:
        return words
    i = rng.randrange(len(words) - length + 1)
    return words[i:i + length]


def crop(words: list[str], rng: random.Random) -> list[str]:
    """Keep a contiguous window of 50-90% of the words."""
    if len(words) < 3:
        return list(words)
    k = max(2, int(len(words) * rng.uniform(0.5, 0.9)))
    i = rng.randrange(0, len(words) - k + 1)
    return words[i:i + k]


def mix(a: list[str], b: list[str], rng: random.Random) -> list[str]:
    """The first part of one text joined to the last part of another."""
    ca = rng.randint(1, max(1, len(a) - 1)) if len(a) > 1 else len(a)
    cb = rng.randint(0, max(0, len(b) - 1))
    return a[:ca] + b[cb:]


def vocabulary_words(tokenizer, limit: int = 20000) -> list[str]:
    """Whole-word entries of the tokenizer's vocabulary, in id order (for WordPiece and BPE
    vocabularies roughly frequency order), without special, unused or sub-word pieces."""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    words = []
    for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        w = tok.lstrip("Ġ▁")  # BPE / SentencePiece word-start markers
        if tok in special or tok.startswith("##") or not w.isalpha() or len(w) < 2 or "unused" in w:
            continue
        words.append(w)
    return words[:limit]


def replace_words(words: list[str], rng: random.Random, vocab: list[str], p: float = 0.3) -> list[str]:
    """Replace about ``p`` of the words by vocabulary words (more often frequent ones), so the
    teacher shows the student how it treats words the shots never contain."""
    if not vocab:
        return list(words)
    n = len(vocab)
    out = [vocab[min(n - 1, int(n * rng.random() ** 2))] if rng.random() < p else w for w in words]
    if out == words and words:
        out[rng.randrange(len(words))] = vocab[rng.randrange(n)]
    return out


@dataclass
class Lexicon:
    """Words the augmentations may bring in: ``words`` (the vocabulary, frequent first) and
    ``near`` (for words of the shots, their nearest neighbours in the teacher's embedding space)."""

    words: list[str] = field(default_factory=list)
    near: dict[str, list[str]] = field(default_factory=dict)


def _strip(word: str) -> str:
    return word.lower().strip(".,;:!?\"'()")


def nearest_words(tokenizer, table, words: set[str], vocab: list[str], k: int = 8) -> dict[str, list[str]]:
    """For each word of ``words`` that is one vocabulary entry, the ``k`` vocabulary words whose
    input embeddings (rows of ``table``, the teacher's own) are closest in cosine: the substitutes
    a thesaurus-based augmenter would pick (TinyBERT's lexical augmentation uses GloVe or BERT's
    MLM), taken from the model being distilled so that any teacher has them."""
    import torch

    index = tokenizer.get_vocab()

    def token_id(w: str) -> int | None:  # WordPiece: "word"; BPE: "Ġword"; SentencePiece: "▁word"
        return next((index[t] for t in (w, "Ġ" + w, "▁" + w) if t in index), None)

    known = [(w, token_id(w)) for w in vocab]
    known = [(w, i) for w, i in known if i is not None and i < table.shape[0]]
    query = {w: i for w in map(_strip, words) if w.isalpha() and (i := token_id(w)) is not None and i < table.shape[0]}
    if not query or not known:
        return {}
    with torch.no_grad():
        emb = torch.nn.functional.normalize(table.float(), dim=-1)
        sims = emb[list(query.values())] @ emb[[i for _, i in known]].T  # [shot words, vocabulary words]
        top = sims.topk(min(k + 1, len(known)), dim=-1).indices.tolist()
    return {w: [known[j][0] for j in row if known[j][0] != w][:k] for w, row in zip(query, top)}


def replace_near(words: list[str], rng: random.Random, near: dict[str, list[str]], p: float = 0.3) -> list[str]:
    """Replace about ``p`` of the words that have neighbours by one of them."""
    cands = [i for i, w in enumerate(words) if near.get(_strip(w))]
    if not cands:
        return list(words)
    out = list(words)
    chosen = [i for i in cands if rng.random() < p] or [rng.choice(cands)]
    for i in chosen:
        out[i] = rng.choice(near[_strip(words[i])])
    return out


def augment_text(text: str, other: str, op: str, rng: random.Random, mask: str,
                 lexicon: Lexicon | None = None) -> str:
    words = text.split()
    if not words:
        return text
    if op == "mask":
        out = mask_words(words, rng, mask)
    elif op == "drop":
        out = drop_words(words, rng)
    elif op == "swap":
        out = swap_spans(words, rng)
    elif op == "crop":
        out = crop(words, rng)
    elif op == "vocab":
        out = replace_words(words, rng, lexicon.words if lexicon else [])
    elif op == "near":
        out = replace_near(words, rng, lexicon.near if lexicon else {})
    elif op == "mix":
        out = mix(words, other.split() or words, rng)
    else:
        raise ValueError(f"unknown augmentation {op!r}; known: {', '.join(OPS)}")
    return " ".join(out)


def build_transfer_set(shots: list[Example], per_shot: int, seed: int, mask_token: str,
                       unlabeled: list[str] | None = None, ops: tuple[str, ...] = OPS,
                       lexicon: Lexicon | None = None) -> TransferSet:
    """The shots, ``per_shot`` augmented variants of each, and any unlabeled texts (cut to the
    longest shot's length)."""
    rng = random.Random(seed)
    is_pair = any(s.text_pair is not None for s in shots)
    texts = [s.text for s in shots]
    pairs = [s.text_pair or "" for s in shots] if is_pair else None
    origin = ["shot"] * len(shots)
    for k in range(per_shot):
        for i, s in enumerate(shots):
            op = ops[(k + i) % len(ops)]
            other = shots[rng.randrange(len(shots))]
            if is_pair and rng.random() < 0.5:  # vary one side of a pair at a time
                texts.append(s.text)
                pairs.append(augment_text(s.text_pair or "", other.text_pair or "", op, rng, mask_token, lexicon))
            else:
                texts.append(augment_text(s.text, other.text, op, rng, mask_token, lexicon))
                if pairs is not None:
                    pairs.append(s.text_pair or "")
            origin.append(f"aug:{op}")
    longest = max(1, max(len(s.text.split()) for s in shots))
    for t in unlabeled or []:
        # raw text far longer than the task's inputs costs time and looks unlike what the student will
        # serve; cutting it to random shots' lengths lost 1.8 points on SST-2 (draw 0), so only to the longest
        texts.append(" ".join(fit_length(t.split(), longest, rng)))
        if pairs is not None:  # raw pair text is rarely available: pair it with a shot's second part
            pairs.append(shots[rng.randrange(len(shots))].text_pair or "")
        origin.append("unlabeled")
    return TransferSet(texts, pairs, origin)
