"""Extractive QA: SQuAD loading, answer decoding, EM/F1, and the adapter end to end on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, _config, _tokenizer


@pytest.fixture(scope="module")
def tiny_qa(tmp_path_factory) -> Path:
    """A tiny BertForQuestionAnswering, random weights."""
    import torch
    from transformers import BertForQuestionAnswering

    path = tmp_path_factory.mktemp("tiny-qa")
    tok = _tokenizer(path)
    torch.manual_seed(0)
    BertForQuestionAnswering(_config(len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory) -> Path:
    """SQuAD 2.0-format data: 6 articles, answerable and unanswerable questions."""
    rng = np.random.default_rng(0)
    words = sorted(WORDS)
    data = []
    for a in range(6):
        paragraphs = []
        for p in range(2):
            context = " ".join(rng.choice(words, 40))
            qas = []
            for q in range(3):
                i = int(rng.integers(0, 35))
                span = " ".join(context.split()[i:i + 2])
                qas.append({"id": f"{a}-{p}-{q}", "question": " ".join(rng.choice(words, 6)) + "?",
                            "answers": [{"text": span, "answer_start": context.index(span)}], "is_impossible": False})
            qas.append({"id": f"{a}-{p}-x", "question": "what is not here?", "answers": [], "is_impossible": True})
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"article {a}", "paragraphs": paragraphs})
    path = tmp_path_factory.mktemp("squad") / "dev-v2.0.json"
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def test_squad_loader_holds_out_whole_articles(squad_file):
    from fscompile.data.qa import load_qa_task

    task = load_qa_task(str(squad_file), shots=2, seed=0)
    assert task.label_names == ["answerable", "unanswerable"]
    assert sorted(e.label for e in task.shots) == [0, 0, 1, 1]
    assert {e.title for e in task.shots}.isdisjoint({e.title for e in task.eval})
    assert load_qa_task(str(squad_file), shots=2, seed=0).shot_indices == task.shot_indices


def test_squad_metrics_and_decoding(tiny_qa, squad_file):
    from fscompile.data.qa import QAExample
    from fscompile.models.qa import load_qa_teacher
    from fscompile.tasks.qa import decode, encode, f1_score, normalize, squad_metrics

    assert normalize("The  Cat, sat!") == "cat sat"
    assert f1_score("the cat sat", "cat sat down") == pytest.approx(0.8)
    ex = [QAExample("1", "who?", "alpha beta gamma", ("beta",), (6,)), QAExample("2", "why?", "alpha", (), ())]
    m = squad_metrics(["Beta.", ""], ex, reference=["beta", "alpha"])
    assert m["exact_match"] == 1.0 and m["f1"] == 1.0 and m["agreement"] == 0.5
    assert squad_metrics(["alpha", "alpha"], ex)["exact_match"] == 0.0  # answering the unanswerable is wrong
    # the official HasAns / NoAns split: always abstaining scores on the unanswerable half only
    m = squad_metrics(["", ""], ex)
    assert (m["exact_match"], m["has_answer_f1"], m["no_answer_accuracy"], m["has_answer_n"]) == (0.5, 0.0, 1.0, 1)

    model = load_qa_teacher(str(tiny_qa))
    w = [x for x in sorted(WORDS) if x.isalpha()][:4]
    context = " ".join(w)
    qa = [QAExample("1", f"{w[0]}?", context, (f"{w[1]} {w[2]}",), (len(w[0]) + 1,))]
    enc = encode(model, qa, 64)
    toks = enc.tokens(0)
    s = toks.index(w[1], toks.index("[SEP]"))
    logits = np.zeros((len(toks), 2), dtype=np.float32)
    logits[s, 0] = logits[s + 1, 1] = 5.0
    assert decode([logits], enc, qa) == [f"{w[1]} {w[2]}"]
    logits[0] = 20.0  # the no-answer score at [CLS] wins
    assert decode([logits], enc, qa) == [""]
    assert decode([logits], enc, qa, threshold=31.0) == [f"{w[1]} {w[2]}"]  # unless it must win by more


def test_no_answer_threshold_is_tuned_against_the_teacher():
    from fscompile.tasks.qa import tune_threshold

    # a student whose no-answer scores sit above its spans everywhere: at threshold 0 it always
    # abstains, though its spans agree with the teacher's on the questions the teacher answers
    scored = [("alpha beta", 2.0), ("Gamma.", 2.5), ("delta", 4.0), ("wrong", 5.0), ("", float("inf"))]
    t, f1 = tune_threshold(scored, ["alpha beta", "gamma", "", "", ""])
    assert 2.5 <= t < 4.0 and f1 == 1.0
    # equally good thresholds: the one nearest 0 (the untuned default)
    assert tune_threshold([("a", -1.0), ("b", 1.0)], ["a", ""]) == (0.0, 1.0)
    # answering where the teacher abstains only loses: the threshold stays below that span
    assert tune_threshold([("x", -3.0)], [""])[0] < -3.0


def test_span_kd_teaches_spans_where_the_teacher_abstains():
    import torch

    from fscompile.tasks.qa import _span_kd

    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    teacher = torch.tensor([[[9.0, 9.0], [0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 0.0], [5.0, 5.0]]])
    assert _span_kd(teacher, teacher, mask, 2.0).abs() < 1e-6
    # as sure of [CLS] as the teacher, but its span in the wrong place (and padding ignored)
    student = teacher.clone()
    student[0, 1:5] = torch.tensor([[3.0, 3.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    student[0, 5] = -5.0
    # the KL over all tokens alone hardly sees it, since the teacher's mass sits on [CLS]
    t, st = teacher[:, :5] / 2, student[:, :5] / 2
    full = torch.nn.functional.kl_div(st.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean") * 2
    assert _span_kd(student, teacher, mask, 2.0) > 5 * full > 0


def test_long_context_is_read_in_overlapping_windows(tiny_qa):
    from fscompile.data.qa import QAExample
    from fscompile.models.qa import load_qa_teacher
    from fscompile.tasks.qa import decode, encode

    model = load_qa_teacher(str(tiny_qa))
    words = [x for x in sorted(WORDS) if x.isalpha()]
    context = " ".join(words[i % len(words)] for i in range(300))
    answer = " ".join(context.split()[290:292])
    start = len(" ".join(context.split()[:290])) + 1
    qa = [QAExample("1", "which?", context, (answer,), (start,)), QAExample("2", "short?", "alpha beta", (), ())]
    enc = encode(model, qa, 64)
    feats = [f for f, i in enumerate(enc["overflow_to_sample_mapping"]) if i == 0]
    assert len(feats) > 4 and enc["overflow_to_sample_mapping"][-1] == 1  # no context token is lost
    covered = {o for f in feats for o, s in zip(enc["offset_mapping"][f], enc.sequence_ids(f)) if s == 1}
    assert max(e for _, e in covered) == len(context)
    # consecutive windows overlap
    first = [o for o, s in zip(enc["offset_mapping"][feats[0]], enc.sequence_ids(feats[0])) if s == 1]
    second = [o for o, s in zip(enc["offset_mapping"][feats[1]], enc.sequence_ids(feats[1])) if s == 1]
    assert second[0][0] < first[-1][1]
    # the answer is found in the last window; the no-answer score is the lowest over the windows
    logits = [np.zeros((len(enc["input_ids"][f]), 2), dtype=np.float32) for f in range(len(enc["input_ids"]))]
    last = feats[-1]
    offs = enc["offset_mapping"][last]
    s = next(j for j, (o, q) in enumerate(zip(offs, enc.sequence_ids(last))) if q == 1 and o[0] == start)
    e = next(j for j, o in enumerate(offs) if j >= s and o[1] == start + len(answer))
    logits[last][s, 0] = logits[last][e, 1] = 5.0
    for f in feats[:-1]:
        logits[f][0] = 20.0  # other windows say "no answer" loudly, the last one does not
    assert decode(logits, enc, qa)[0] == answer
    logits[last][0] = 20.0
    assert decode(logits, enc, qa)[0] == ""


def test_qa_compile_end_to_end(tiny_qa, squad_file, tmp_path):
    import onnxruntime as ort
    import torch

    import fscompile
    from fscompile.models import load_any

    out = tmp_path / "out"
    m = fscompile.compile(str(tiny_qa), data=str(squad_file), shots=2, steps=8, batch_size=2, augment=3,
                          student_layers="0,2", profile_seconds=0.02, out=out, unlabeled=str(squad_file))
    assert m["task"] == "question-answering" and m["student"]["layers_kept"] == [0, 2]
    # the data file doubles as the unlabeled pool: every question but those on evaluation contexts
    from fscompile.data.qa import load_qa_task, load_unlabeled_qa

    task = load_qa_task(str(squad_file), shots=2, seed=0)
    pool = load_unlabeled_qa(str(squad_file), task.eval)
    assert len(pool) == 48 - len(task.eval) > 0
    # a quarter of the pool is held out for early stopping; of the rest, the steps x batch (16) that training can show
    assert len(pool) - len(pool) // 4 > 16
    assert m["distillation"]["transfer_origin"]["unlabeled"] == 16
    assert not {c for _, c in pool} & {e.context for e in task.eval}
    for who in ("teacher", "student", "artifact"):
        assert {"exact_match", "f1", "agreement"} <= set(m["metrics"][who])
        assert 0 <= m["metrics"][who]["f1"] <= 1
    assert m["metrics"]["teacher"]["agreement"] == 1.0
    report = (out / "report.md").read_text()
    assert "| model | EM | F1 |" in report and "answerable questions" in report
    sess = ort.InferenceSession(str(out / "model/model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["start_logits", "end_logits"]
    cfg = json.loads((out / "model/config.json").read_text())
    assert cfg["architectures"] == ["BertForQuestionAnswering"]
    # the no-answer threshold tuned on held-out shots at the kept step travels with the artifact
    kept = [c for c in m["distillation"]["validation"] if c["step"] == m["distillation"]["best_step"]]
    assert cfg["null_score_diff_threshold"] == kept[0]["threshold"] and "No-answer threshold" in report
    # the torch copy written for profiling round-trips as a QA model
    from fscompile.models.qa import QAModel, load_qa_teacher

    teacher = load_qa_teacher(str(tiny_qa))
    teacher.save_torch(tmp_path / "copy")
    again = load_any(tmp_path / "copy")
    assert isinstance(again, QAModel)
    x = teacher.encode(["who?"], ["someone here"])
    with torch.no_grad():
        assert torch.allclose(again.module(**x).logits, teacher.module(**x).logits, atol=1e-6)


def test_classifier_teacher_is_refused_for_qa(tiny_teacher, squad_file, tmp_path):
    from click.testing import CliRunner

    from fscompile.cli import main

    r = CliRunner().invoke(main, [str(tiny_teacher), "--task", "question-answering", "--data", str(squad_file),
                                  "--shots", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 3 and "no question-answering head" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_real_squad_subset_loads(shared):
    from fscompile.data.qa import load_qa_task

    task = load_qa_task(str(shared / "data/squad_v2/dev-v2.0.cs224n-subset.json"), shots=10, seed=0)
    assert len(task.shots) == 20 and len(task.eval) > 1000
    assert any(not e.answers for e in task.eval) and any(e.answers for e in task.eval)
    for e in task.shots:
        for text, start in zip(e.answers, e.starts):
            assert e.context[start:start + len(text)] == text


def test_qa_bench_runs_through_the_same_tables(tiny_qa, squad_file, tmp_path):
    """fscompile bench on a QA teacher: fscompile rows and the teacher's peers, scored by EM/F1."""
    from click.testing import CliRunner

    from fscompile.cli import main

    out = tmp_path / "bench"
    r = CliRunner().invoke(main, ["bench", "--teacher", str(tiny_qa), "--data", str(squad_file), "--targets",
                                  "ort-int8", "--shots", "2", "--seeds", "1", "--steps", "4", "--max-eval", "12",
                                  "--profile-seconds", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    systems = {row.get("system") for row in rows}
    assert {"fscompile ort-int8", "teacher PyTorch fp32", "teacher ORT dynamic INT8"} <= systems
    assert all(0 <= row["f1"] <= 1 for row in rows if row.get("system"))
    assert "fscompile ort-int8" in (out / "table.md").read_text()
