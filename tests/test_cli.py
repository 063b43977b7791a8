import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fscompile.cli import main

FAST = ["--steps", "4", "--augment", "2", "--batch-size", "4", "--profile-seconds", "0.05", "--seq-len", "16",
        "--generator", "none"]


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_help_of_every_command():
    for args in (["--help"], ["compile", "--help"], ["targets", "--help"]):
        r = run(args)
        assert r.exit_code == 0 and "Usage" in r.output


def test_targets_lists_availability():
    r = run(["targets", "--json"])
    rows = {t["name"]: t for t in json.loads(r.stdout)["targets"]}
    assert rows["ort-int8"]["available"] is True and "int8" in rows["ort-int8"]["precisions"]


def test_compile_end_to_end_with_headless_teacher(tiny_headless, tmp_path):
    out = tmp_path / "run"
    r = run([str(tiny_headless), "--shots", "4", "--out", str(out), "--json", *FAST])
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert (out / "manifest.json").is_file() and (out / "report.md").is_file()
    assert (out / "model" / "model.onnx").is_file()
    assert manifest["teacher"]["adaptation"]["method"].startswith("contrastive fine-tuning")
    assert 0.05 <= manifest["teacher"]["adaptation"]["temperature"] <= 20  # the head calibrated on the shots
    assert manifest["data"]["label_names"] == ["negative", "positive"]
    assert set(manifest["metrics"]) == {"teacher", "student", "artifact"}
    assert manifest["profile"]["artifact"]["batch8"]["p50_ms"] > 0
    assert "| artifact (ort-int8" in (out / "report.md").read_text()
    assert "No `--unlabeled` text" in (out / "report.md").read_text()
    assert manifest["distillation"]["lr"] == 5e-5 and "(peak lr 5e-05)" in (out / "report.md").read_text()
    # same run again into the same directory: allowed (same fingerprint), not a different one
    assert run([str(tiny_headless), "--shots", "4", "--out", str(out), "--quiet", *FAST]).exit_code == 0
    r = run([str(tiny_headless), "--shots", "5", "--out", str(out), *FAST])
    assert r.exit_code == 3 and "already holds a different run" in r.output


def test_compile_with_head_and_default_out(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from fscompile.data.loaders import BUILTIN_DIR

    # the task's own data directory as the unlabeled pool: its dev split (the evaluation) is left out,
    # no more texts than 4 steps of 4 can show are labelled by the teacher, and a quarter of those is
    # held out for early stopping
    r = run([str(tiny_teacher), "--target", "ort-fp32", "--shots", "3", "--quiet", "--unlabeled", str(BUILTIN_DIR), *FAST])
    assert r.exit_code == 0, r.output
    outs = list((tmp_path / "fscompile-out").iterdir())
    assert len(outs) == 1 and outs[0].name.endswith("ort-fp32-3shot-seed0")
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["distillation"]["transfer_origin"]["unlabeled"] == 12
    assert manifest["distillation"]["lr"] == 2e-4  # the default with unlabeled text
    assert "No `--unlabeled` text" not in (outs[0] / "report.md").read_text()


@pytest.mark.parametrize("args,code,message", [
    (["--target", "ort-int9"], 3, "Did you mean ort-int8"),
    (["--shots", "0"], 2, "--shots must be >= 1"),
    (["--shots", "500"], 3, "fewer than --shots 500"),
    (["--data", "missing.tsv"], 3, "data file not found"),
    (["--unlabeled", "missing.csv"], 3, "--unlabeled: data file not found"),
    (["--augment-ops", "mask,shuffle"], 2, "--augment-ops: unknown shuffle"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_teacher, tmp_path, args, code, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(tiny_teacher), "--out", str(out), *FAST, *args])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unknown_model_path_is_one_line(tmp_path):
    r = CliRunner().invoke(main, [str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and "model path not found" in r.output


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "fscompile.cli", "targets"], capture_output=True, text=True)
    assert r.returncode == 0 and "ort-int8" in r.stdout


def test_sst2_teacher_end_to_end(shared, tmp_path):
    out = tmp_path / "sst2"
    r = run([str(shared / "teachers/minilm-sst2"), "--data", str(shared / "data/glue_sst2"), "--shots", "4",
             "--max-eval", "64", "--out", str(out), "--json", *FAST])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["metrics"]["teacher"]["accuracy"] > 0.8  # the fine-tuned teacher itself
    assert m["data"]["eval_split"] == "dev"
