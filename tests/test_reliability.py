"""Bad input, interruption, resume, determinism and fuzzing (issue 7)."""
import errno
import json
import os

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fscompile
from fscompile.cli import main
from fscompile.data import load_task_data
from fscompile.errors import InputError

FAST = ["--steps", "3", "--augment", "2", "--batch-size", "4", "--profile-seconds", "0.02", "--seq-len", "16",
        "--max-eval", "10", "--generator", "none"]


def invoke(args):
    return CliRunner().invoke(main, args)


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


CASES = {
    "unknown hub id": (lambda t, d: ["no-such-org/no-such-model-xyz"], 3, "cannot load model"),
    "path that is not a model": (lambda t, d: [str(d)], 3, "cannot load model"),
    "teacher labels do not match": (lambda t, d: [t, "--data", write(d / "abc.csv", "text,label\n" + "".join(
        f"row {i},{'abc'[i % 3]}\n" for i in range(30))), "--shots", "3"], 3, "do not match"),
    "missing data file": (lambda t, d: [t, "--data", str(d / "missing.jsonl")], 3, "not found"),
    "empty data file": (lambda t, d: [t, "--data", write(d / "empty.csv", "")], 3, "empty"),
    "no label column": (lambda t, d: [t, "--data", write(d / "nolabel.jsonl", '{"text": "a b"}\n' * 5)], 3,
                        "no label column"),
    "not UTF-8": (lambda t, d: [t, "--data", write(d / "latin.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"), "wb")],
                  3, "not UTF-8"),
    "too few rows per class": (lambda t, d: [t, "--shots", "200"], 3, "fewer than --shots"),
    "zero shots": (lambda t, d: [t, "--shots", "0"], 2, "--shots must be >= 1"),
    "embedding bits": (lambda t, d: [t, "--embedding-bits", "5"], 2, "--embedding-bits must be 4 or 8"),
    "negative shots": (lambda t, d: [t, "--shots", "-3"], 2, "--shots must be >= 1"),
    "vanishing temperature": (lambda t, d: [t, "--temperature", "1e-149"], 2, "--temperature must be in [0.1, 100]"),
    "unknown target": (lambda t, d: [t, "--target", "tpu-int3"], 3, "unknown target"),
    "target unavailable": (lambda t, d: [t, "--target", "trt-int8"], 4, "not available here"),
    "out not writable": (lambda t, d: [t, "--out", str(d / "file.txt" / "sub")], 3, "--out"),
    # os.access(W_OK) is true there for root: only a real write tells, and it must tell before the compile
    "out where nothing can be written": (lambda t, d: [t, "--out", "/proc/fscompile-out"], 3,
                                         "cannot write in /proc"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exit_code_message_nothing_written(case, tiny_teacher, tmp_path):
    from fscompile.backends.tensorrt import tensorrt_status

    if case == "target unavailable" and tensorrt_status()[0]:
        pytest.skip("TensorRT is available here")
    make, code, message = CASES[case]
    (tmp_path / "file.txt").write_text("x")
    args = make(str(tiny_teacher), tmp_path)
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    r = invoke([*args, *FAST])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if "error" in ln.lower()]) == 1  # one line says why
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_disk_full_is_one_line_and_keeps_previous_out(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "manifest.json")

    monkeypatch.setattr("fscompile.pipeline.write_json", full)
    r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(out), "--force", *FAST])
    assert r.exit_code == 5 and "disk full" in r.output and "Traceback" not in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".out.*"))


def test_interrupt_after_distillation_then_resume(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    from fscompile.backends.onnxruntime import OrtInt8Backend

    real = OrtInt8Backend.compile

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(OrtInt8Backend, "compile", interrupted)
    args = [str(tiny_teacher), "--shots", "3", "--out", str(out), "--force", "--json", *FAST]
    r = invoke(args)
    assert r.exit_code == 130 and "nothing was written" in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.setattr(OrtInt8Backend, "compile", real)
    r = invoke(args)
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["distillation"]["resumed_from"]  # the distilled student was not trained again
    assert not os.path.exists(m["distillation"]["resumed_from"])  # and its checkpoint is gone


def test_stale_staging_from_a_killed_run_is_cleaned(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.fscompile-tmp-99999999").mkdir()
    (tmp_path / ".out.fscompile-old-99999998").mkdir()
    (tmp_path / ".out.fscompile-old-99999998" / "manifest.json").write_text("{}")
    r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(out), "--force", *FAST])
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob(".out.*"))


def test_same_seed_same_everything(tiny_headless, tmp_path):
    kw = dict(data=None, shots=3, steps=6, augment=2, profile_seconds=0.02, seq_len=16, max_eval=20, generator="none")
    a = fscompile.compile(str(tiny_headless), out=tmp_path / "a", **kw)
    b = fscompile.compile(str(tiny_headless), out=tmp_path / "b", **kw)
    assert a["data"]["shot_indices"] == b["data"]["shot_indices"]
    assert a["student"]["weights_sha256"] == b["student"]["weights_sha256"]
    assert a["metrics"] == b["metrics"] and a["fingerprint"] == b["fingerprint"]
    c = fscompile.compile(str(tiny_headless), out=tmp_path / "c", seed=1, **kw)
    assert c["data"]["shot_indices"] != a["data"]["shot_indices"]


ROW = st.dictionaries(st.sampled_from(["text", "label", "sentence", "x", "", "question"]),
                      st.one_of(st.text(max_size=30), st.integers(-3, 5), st.none(), st.floats(allow_nan=True)),
                      max_size=4)
FUZZ_COUNT = {"loaders": 0, "cli": 0, "archives": 0}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, max_size=12), fmt=st.sampled_from(["jsonl", "csv", "tsv", "raw"]),
       raw=st.binary(max_size=200), bom=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]),
       shots=st.integers(1, 3))
def test_fuzz_loaders_raise_only_input_errors(tmp_path_factory, rows, fmt, raw, bom, shots):
    d = tmp_path_factory.mktemp("fuzz")
    if fmt == "raw":
        path = d / "data.csv"
        path.write_bytes(bom + raw)
    elif fmt == "jsonl":
        path = d / "data.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        path = d / f"data.{fmt}"
        keys = sorted({k for r in rows for k in r}) or ["text"]
        path.write_text("\n".join([sep.join(keys)] + [sep.join(str(r.get(k, "")) for k in keys) for r in rows]))
    FUZZ_COUNT["loaders"] += 1
    try:
        task = load_task_data(str(path), shots=shots, seed=0)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert len(task.shots) == shots * task.num_labels and task.eval


MEMBER = st.tuples(st.text(alphabet="ab./_-\\", min_size=1, max_size=14), st.binary(max_size=64))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(MEMBER, max_size=8), kind=st.sampled_from(["zip", "tar", "tar.gz", "raw"]),
       raw=st.binary(max_size=200))
def test_fuzz_archives_raise_only_input_errors(tmp_path_factory, members, kind, raw):
    """Archives with odd member names (.., absolute, backslashes), bytes that are not images, or not
    archives at all: a one-line input error or a result, nothing else."""
    import io
    import tarfile
    import zipfile

    from fscompile.data.images import load_image_splits

    path = tmp_path_factory.mktemp("arch") / f"data.{'zip' if kind == 'raw' else kind}"
    if kind == "raw":
        path.write_bytes(raw)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name + ".png", data)
    else:
        with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name + ".png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    FUZZ_COUNT["archives"] += 1
    try:
        load_image_splits(str(path))
    except InputError as e:
        assert str(e) and "\n" not in str(e)


OPTION = st.sampled_from([
    ("--shots", st.integers(-2, 4)), ("--steps", st.integers(-1, 4)), ("--lr", st.floats(-1e-3, 1e-2)),
    ("--temperature", st.floats(-1, 5)), ("--prune", st.floats(-0.5, 1.5)), ("--seq-len", st.integers(-4, 40)),
    ("--max-eval", st.integers(-1, 30)), ("--target", st.sampled_from(["ort-int8", "ort-fp32", "nope", "trt-fp16"])),
    ("--student-layers", st.sampled_from(["0", "1", "2", "9", "0,1", "a,b", "every-other", "-1"])),
    ("--calibration", st.sampled_from(["auto", "minmax", "bogus"])), ("--augment", st.integers(-1, 2)),
    ("--generate", st.integers(-2, 3)),
])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_cli_options_never_traceback(tiny_teacher, tmp_path_factory, data):
    picks = data.draw(st.lists(OPTION, min_size=1, max_size=4, unique_by=lambda o: o[0]))
    args = [str(tiny_teacher), "--out", str(tmp_path_factory.mktemp("o") / "run"), "--batch-size", "4",
            "--profile-seconds", "0.02", "--augment", "1", "--steps", "2", "--max-eval", "8", "--seq-len", "16",
            "--generator", "none"]
    for name, values in picks:
        args += [name, str(data.draw(values))]
    FUZZ_COUNT["cli"] += 1
    r = CliRunner().invoke(main, args)
    assert r.exit_code in (0, 2, 3, 4), r.output
    assert "Traceback" not in r.output
    if r.exit_code:
        assert r.output.strip(), "a failure must say why"


def test_zz_report_fuzz_counts():
    """Record how many fuzz cases ran (pytest -s shows it; the closing note quotes it)."""
    print(f"fuzz cases run: {FUZZ_COUNT}")
    assert FUZZ_COUNT["loaders"] >= 100 and FUZZ_COUNT["cli"] >= 10 and FUZZ_COUNT["archives"] >= 50


def test_fallback_ships_a_verified_variant(tiny_teacher, tmp_path):
    # a negative tolerance makes the accuracy check fail whatever the artifact does
    m = fscompile.compile(str(tiny_teacher), out=tmp_path / "o", shots=3, steps=3, augment=2, profile_seconds=0.02,
                          seq_len=16, max_eval=10, fallback=True, tolerance=-1.0, generator="none")
    v = m["verification"]
    assert not v["ok"] and "accuracy_within_tolerance" in v["failed"] and v["fallback"]
    assert (tmp_path / "o" / "model" / "model.onnx").is_file() and not (tmp_path / "o" / "model.fp32").exists()
    assert "Fallback:" in (tmp_path / "o" / "report.md").read_text()


def test_a_second_compile_into_the_same_out_fails_at_once(tiny_teacher, tmp_path):
    from fscompile.outdir import locked

    out = tmp_path / "out"
    with locked(out):  # another compile holds --out
        r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(out), *FAST])
    assert r.exit_code == 3 and "is being written by another fscompile" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists() and not list(tmp_path.glob(".out.*"))


def test_timeout_stops_the_compile_and_writes_nothing(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(out), "--timeout", "1", *FAST])
    assert r.exit_code == 5 and "ran past --timeout 1 s" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists() and not list(tmp_path.glob(".out.*"))


def test_timeout_is_not_swallowed_by_a_fallback_that_catches_exception():
    """The backends fall back when one quantizer fails (``except Exception``); a --timeout that fires
    inside such a fallback must still end the compile (CI once saw a 1 s timeout compile for 14 s)."""
    import time

    from fscompile.cli import _deadline
    from fscompile.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded), _deadline(0.2):
        try:
            time.sleep(2)
        except Exception:  # what a fallback does
            pass
        time.sleep(0.1)


def test_real_world_text_compiles_and_the_report_counts_what_was_left_out(tiny_teacher, tmp_path):
    """Quoted newlines, control characters, a 100,000-character review, empty texts, labels that differ
    only by case and whitespace, and evaluation rows that repeat a shot, in one data directory."""
    import csv

    d = tmp_path / "data"
    d.mkdir()
    pos = ["a fine film", "loved it\nevery minute", "great\x0bcast and \u2028crew", "superb " * 14_000,
           "warm and funny", "a joy"]
    neg = ["dull", "a tedious\r\nmess", "awful acting", "boring plot", "weak script", "far too long"]
    train = [(t, "Positive" if i % 2 else " positive ") for i, t in enumerate(pos)] + [(t, "negative") for t in neg]
    train += [("", "positive"), ("   ", "negative")]
    dev = train[:12] + [("fresh and bright", "positive"), ("clumsy", "negative"), ("charming", "POSITIVE"),
                        ("grim", "negative")]
    for name, rows in (("train.csv", train), ("dev.csv", dev)):
        with (d / name).open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    out = tmp_path / "out"
    r = invoke([str(tiny_teacher), "--data", str(d), "--shots", "3", "--out", str(out), "--json", *FAST])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout[r.stdout.index("{"):])
    assert m["data"]["label_names"] == ["negative", "positive"]
    assert m["data"]["labels_merged"] == {"Positive": "positive", "POSITIVE": "positive"}
    # the six shots' copies in dev are not scored; the two empty texts (train) are skipped
    assert m["data"]["dropped"] == {"empty text": 2, "evaluation rows repeating a shot": 6}
    assert m["data"]["eval_rows"] == 10
    report = (out / "report.md").read_text()
    assert "left out 2 empty text, 6 evaluation rows repeating a shot" in report


def test_quoted_newlines_and_control_characters_stay_inside_their_field(tmp_path):
    from fscompile.data.loaders import read_table

    f = tmp_path / "t.csv"
    f.write_text('text,label\n"line one\nline two",pos\n"bell\x0bvt and \u2028 sep",neg\n', encoding="utf-8")
    assert [r["text"] for r in read_table(f)] == ["line one\nline two", "bell\x0bvt and \u2028 sep"]
    bom = tmp_path / "bom.csv"  # spreadsheet exports: a byte-order mark before the header, or UTF-16
    bom.write_bytes(b"\xef\xbb\xbftext,label\ncaf\xc3\xa9,1\n")
    assert read_table(bom) == [{"text": "café", "label": "1"}]
    bom.write_bytes("text,label\ncafé,1\n".encode("utf-16"))
    assert read_table(bom) == [{"text": "café", "label": "1"}]
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a\u2028b", "label": 1}\n{"text": "c", "label": 0}\n', encoding="utf-8")
    assert [r["text"] for r in read_table(j)] == ["a\u2028b", "c"]


def test_too_little_disk_for_the_teacher_fails_before_any_work(tiny_teacher, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("fscompile.outdir.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr("fscompile.pipeline.distill_stage", lambda *a: pytest.fail("work started"))
    out = tmp_path / "out"
    r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(out), *FAST])
    assert r.exit_code == 3 and "MB free in" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_an_unreachable_hub_means_offline_said_once(tiny_teacher, tmp_path, monkeypatch):
    import socket

    import huggingface_hub

    def refuse(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(tmp_path / "out"), "--quiet", *FAST])
    assert r.exit_code == 0, r.output
    assert r.output.count("is unreachable; working offline") == 1
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.is_offline_mode()


@pytest.mark.parametrize("where,stage", [("fscompile.pipeline.distill_stage", None),
                                         ("fscompile.pipeline.profile_all", "profile"),
                                         ("fscompile.pipeline.verify", "verify"),
                                         ("fscompile.pipeline.render_markdown", None)])
@pytest.mark.parametrize("fault", ["kill", "stage"])
def test_a_failure_at_each_stage_boundary_leaves_out_as_it_was(tiny_teacher, tmp_path, monkeypatch, where, stage,
                                                              fault):
    """Ctrl-C (or a stage error) at each boundary: the previous --out stays, nothing is half-written,
    and a stage error names its stage."""
    from fscompile.errors import StageError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")

    def fail(*a, **k):
        raise KeyboardInterrupt if fault == "kill" else StageError("it broke")

    monkeypatch.setattr(where, fail)
    r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(out), "--force", *FAST])
    assert r.exit_code == (130 if fault == "kill" else 5), r.output
    assert "nothing was written" in r.output and "Traceback" not in r.output
    if fault == "stage" and stage:
        assert f"error: {stage}: it broke; nothing was written" in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".out.*"))


def test_a_missing_generator_fails_before_any_work(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr("fscompile.tasks.text.load_data", lambda *a: pytest.fail("work started"))
    out = tmp_path / "out"
    r = invoke([str(tiny_teacher), "--shots", "3", "--out", str(out), *FAST, "--generator", str(tmp_path / "no.gguf")])
    assert r.exit_code == 3 and "--generator" in r.output and "file not found" in r.output, r.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
