import json

import pytest
from click.testing import CliRunner

from fscompile.bench import Sweep, load_results
from fscompile.cli import main

FAST = ["--steps", "3", "--profile-seconds", "0.05", "--max-eval", "20", "--generator", "none"]


@pytest.fixture(scope="module")
def bench_dir(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = CliRunner().invoke(main, ["bench", "--teacher", str(tiny_teacher), "--targets", "ort-int8,ort-fp32",
                                  "--shots", "3", "--seeds", "2", "--jobs", "2", "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    return out


def test_bench_writes_rows_tables_and_plot(bench_dir):
    rows = load_results([bench_dir])
    systems = {r["system"] for r in rows if r["kind"] != "job-done"}
    assert {"fscompile ort-int8", "fscompile ort-fp32", "teacher PyTorch fp32", "teacher ORT fp32",
            "teacher ORT dynamic INT8", "teacher ORT static INT8"} <= systems
    assert sorted((r["shots"], r["seed"]) for r in rows if r["kind"] == "job-done") == [(3, 0), (3, 1)]
    table = (bench_dir / "table.md").read_text()
    assert "| fscompile ort-int8 | 3 | 2 |" in table and "±" in table
    assert (bench_dir / "table.csv").read_text().startswith("system,shots,n,accuracy_mean")
    assert (bench_dir / "pareto.png").stat().st_size > 1000
    assert json.loads((bench_dir / "sweep.json").read_text())["seeds"] == 2


def test_bench_resumes_and_report_rebuilds(bench_dir, tiny_teacher):
    before = (bench_dir / "results.jsonl").read_text()
    r = CliRunner().invoke(main, ["bench", "--teacher", str(tiny_teacher), "--targets", "ort-int8,ort-fp32",
                                  "--shots", "3", "--seeds", "2", "--out", str(bench_dir), *FAST])
    assert r.exit_code == 0 and "resuming: 2 of 2" in r.output
    assert (bench_dir / "results.jsonl").read_text() == before  # nothing ran again
    (bench_dir / "table.md").unlink()
    r = CliRunner().invoke(main, ["report", str(bench_dir)])
    assert r.exit_code == 0 and (bench_dir / "table.md").is_file()


def test_sweep_config_files(tmp_path):
    (tmp_path / "s.toml").write_text('teacher = "minilm"\ntargets = ["ort-int8", "cpu-vnni"]\nshots = [5, 10]\nseeds = 3\n')
    s = Sweep.from_file(tmp_path / "s.toml", seeds=2)
    assert s.targets == ("ort-int8", "cpu-vnni") and s.shots == (5, 10) and s.seeds == 2
    (tmp_path / "s.yaml").write_text("targets: ort-int8\nshots: 10\nbogus: 1\n")
    with pytest.raises(Exception, match="unknown keys"):
        Sweep.from_file(tmp_path / "s.yaml")


def test_ray_path_on_local_instance(tiny_teacher, tmp_path):
    pytest.importorskip("ray")
    r = CliRunner().invoke(main, ["bench", "--teacher", str(tiny_teacher), "--shots", "3", "--seeds", "1",
                                  "--no-peers", "--ray", "--out", str(tmp_path), *FAST])
    assert r.exit_code == 0, r.output
    assert any(r["kind"] == "job-done" for r in load_results([tmp_path]))


def test_models_timed_in_turns_each_get_their_own_figure():
    import time

    from fscompile.profile import in_turns

    calls = []

    def sleeper(name: str, s: float):
        return lambda: (calls.append(name), time.sleep(s))

    fast, slow = in_turns([sleeper("fast", 0.001), sleeper("slow", 0.004)], rounds=3, budget_s=0.03)
    assert 0.9 < fast < slow and slow > 3.5  # ms
    # in turns: each round runs one, then the other, never all of one first
    switches = sum(a != b for a, b in zip(calls, calls[1:]))
    assert switches == 5
