import json

import pytest

from fscompile.data import detect_columns, load_task_data, sample_shots
from fscompile.data.loaders import read_table
from fscompile.errors import InputError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_keeps_quotes_verbatim(tmp_path):
    f = write(tmp_path / "train.tsv", 'sentence\tlabel\nhe said "great film \t1\nbad " movie\t0\n')
    rows = read_table(f)
    assert rows[0]["sentence"] == 'he said "great film '
    assert rows[1]["label"] == "0"


def test_headerless_csv_detects_label_and_text(tmp_path):
    f = write(tmp_path / "d.csv", '"1","Short","A much longer description of the news item"\n'
                                  '"2","Title","Another long description text here"\n' * 3)
    rows = read_table(f)
    cols = detect_columns(rows)
    assert cols["label"] == "column0" and cols["text"] == "column2"


def test_pairs_detected(tmp_path):
    lines = [json.dumps({"question": f"q{i}?", "sentence": f"s {i}.", "label": "entailment" if i % 2 else "not"})
             for i in range(10)]
    f = write(tmp_path / "qnli.jsonl", "\n".join(lines))
    task = load_task_data(str(f), shots=2, seed=0)
    assert task.is_pair and task.columns["text_pair"] == "sentence"
    assert task.shots[0].text_pair is not None


def test_sampler_stratified_seeded_and_disjoint_eval(tmp_path):
    rows = [json.dumps({"text": f"text number {i}", "label": i % 3}) for i in range(60)]
    f = write(tmp_path / "all.jsonl", "\n".join(rows))
    a = load_task_data(str(f), shots=4, seed=7)
    b = load_task_data(str(f), shots=4, seed=7)
    c = load_task_data(str(f), shots=4, seed=8)
    assert a.shot_indices == b.shot_indices != c.shot_indices
    assert sorted(e.label for e in a.shots) == [0] * 4 + [1] * 4 + [2] * 4
    shot_texts = {e.text for e in a.shots}
    assert len(a.eval) == 48 and not shot_texts & {e.text for e in a.eval}


def test_sampler_refuses_small_class():
    with pytest.raises(InputError, match="fewer than --shots 3"):
        sample_shots([0, 0, 0, 1, 1], 3, 0, ["a", "b"])


def test_directory_splits_and_embedded_default(tmp_path):
    task = load_task_data(None, shots=5, seed=0)
    assert task.label_names == ["negative", "positive"] and task.eval_split == "dev"
    assert len(task.shots) == 10 and len(task.eval) == 60


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"text,label\n\xff\xfe bad,1\n", "not UTF-8"),
    (b"text,other\nhello there,x\n", "no label column|single class"),
])
def test_bad_files(tmp_path, content, message):
    f = tmp_path / "bad.csv"
    f.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_task_data(str(f), shots=1)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_task_data(str(tmp_path / "nope.tsv"), shots=1)


def test_sst2_dev_never_overlaps_shots(shared):
    task = load_task_data(str(shared / "data/glue_sst2"), shots=10, seed=0)
    assert task.eval_split == "dev" and len(task.eval) == 872
    assert not {e.text for e in task.shots} & {e.text for e in task.eval}


def test_labels_that_only_look_numeric_stay_strings():
    from fscompile.data import _normalise_label

    # "¹".isdigit() is True but int("¹") fails: found by the loader fuzz test
    assert _normalise_label("¹") == "¹" and _normalise_label(" 3 ") == 3 and _normalise_label("-2") == -2


def test_unlabeled_pool_from_any_data_spec_never_holds_evaluation_rows(tmp_path):
    from fscompile.data import load_unlabeled

    rows = [json.dumps({"text": f"text number {i}", "label": i % 2}) for i in range(40)]
    f = write(tmp_path / "all.jsonl", "\n".join(rows + rows[:5]))  # repeats are kept once
    task = load_task_data(str(f), shots=3, seed=0)
    # a one-split file as its own pool: the shots and the evaluation rows are all it holds
    with pytest.raises(InputError, match="only the evaluation rows"):
        load_unlabeled(str(f), task.eval + task.shots)
    assert len(load_unlabeled(str(f), task.shots)) == 40 - len({e.text for e in task.shots})
    d = tmp_path / "d"
    d.mkdir()
    write(d / "train.csv", "review,stars\n" + "".join(f"a long review number {i},{i % 5}\n" for i in range(30)))
    write(d / "dev.csv", "review,stars\nheld out review,1\n")
    pool = load_unlabeled(str(d), [load_task_data(str(d), shots=1).eval[0]])
    assert len(pool) == 30 and "held out review" not in pool  # every split, by its text column
    sample = load_unlabeled(str(d), limit=7, seed=3)
    assert len(sample) == 7 and sample == load_unlabeled(str(d), limit=7, seed=3) != load_unlabeled(str(d), limit=7)
    txt = write(tmp_path / "raw.txt", "one line\n\n  two line  \none line\n")
    assert load_unlabeled(str(txt)) == ["one line", "two line"]


@pytest.mark.parametrize("spec,message", [("missing.csv", "--unlabeled: data file not found"),
                                          ("empty.txt", "no text")])
def test_unlabeled_pool_errors(tmp_path, spec, message):
    from fscompile.data import load_unlabeled

    write(tmp_path / "empty.txt", "\n\n")
    with pytest.raises(InputError, match=message):
        load_unlabeled(str(tmp_path / spec))


@pytest.mark.parametrize("spec,calls", [
    ("imdb", [("imdb",)]),
    ("glue/sst2", [("glue", "sst2"), ("glue/sst2",)]),
    ("Salesforce/wikitext/wikitext-2-raw-v1", [("Salesforce/wikitext", "wikitext-2-raw-v1")]),
])
def test_hub_dataset_specs(monkeypatch, spec, calls):
    # the Hub is out of reach here: record what would be asked of it, and the one-line error
    import datasets

    seen = []

    def unreachable(*args, **kwargs):
        seen.append(args)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(InputError, match=f"cannot load dataset '{spec}'.*offline"):
        load_task_data(spec, shots=1)
    assert seen == calls
