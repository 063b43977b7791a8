"""Compile to a budget: budgets, the label-free retention estimate, the recipe memory, the search."""
import json
import multiprocessing

import numpy as np
import pytest
from click.testing import CliRunner

from fscompile import memory
from fscompile.budget import Budget
from fscompile.cli import main
from fscompile.evaluate import (
    RETENTION_TEMPERATURE,
    dropout_probabilities,
    fit_temperature,
    predict,
    retention_estimate,
    retention_sampling_sd,
    softened,
    torch_runner,
)

FAST = ["--steps", "4", "--augment", "2", "--batch-size", "4", "--profile-seconds", "0.05", "--seq-len", "16",
        "--generator", "none", "--shots", "3"]


def test_budget_names_what_fails():
    b = Budget(max_latency_ms=2, max_size_mb=10, min_retention=0.97)
    assert b.violations({"latency_ms": 1.5, "size_mb": 9.0, "retention": 0.98}) == []
    assert b.violations({"latency_ms": 3.1, "size_mb": 12.0, "retention": 0.9}) == [
        "latency 3.1 ms > 2 ms", "size 12 MB > 10 MB", "retention 0.900 < 0.97"]
    assert not Budget() and Budget(max_peak_mb=100)
    with pytest.raises(ValueError, match="--min-retention must be in"):
        Budget(min_retention=1.5)


def test_retention_estimate_weighs_disagreements_by_the_teachers_confidence():
    sure = np.array([[0.99, 0.01]] * 10)
    unsure = np.array([[0.55, 0.45]] * 10)
    agree, one_off = np.zeros(10, dtype=int), np.array([1] + [0] * 9)
    assert retention_estimate(sure, agree) == pytest.approx(1.0)
    assert retention_estimate(sure, one_off) == pytest.approx(0.9 + 0.1 * 0.01 / 0.99)  # a whole point lost
    assert retention_estimate(unsure, one_off) == pytest.approx(0.9 + 0.1 * 0.45 / 0.55)  # most of it kept
    assert retention_estimate(softened(np.log(sure)), one_off) > retention_estimate(sure, one_off)  # softened
    # the teacher's own answers, where given, are what it is credited with, not its top probability
    assert retention_estimate(unsure, agree, np.ones(10, dtype=int)) == pytest.approx(1.0)


def test_the_teacher_is_read_with_its_dropout_on_seeded_and_left_as_it_was(tiny_opinionated):
    import torch

    from fscompile.data import Example
    from fscompile.models.text import load_teacher

    teacher = load_teacher(str(tiny_opinionated))
    rows = [Example(text, 0) for text in ("a good film", "a dull plot", "great acting", "not worth it", "fine")] * 4
    logits = predict(torch_runner(teacher), teacher.tokenizer, teacher.input_names, rows)
    state = torch.random.get_rng_state()
    p = dropout_probabilities(teacher, rows, logits)
    assert not teacher.module.training and torch.equal(torch.random.get_rng_state(), state)
    assert np.allclose(p.sum(-1), 1) and not np.allclose(p, softened(logits, 1.0), atol=1e-3)  # dropout moved it
    assert np.array_equal(p, dropout_probabilities(teacher, rows, logits))  # the same every time
    for m in teacher.module.modules():  # a teacher without dropout: its logits softened instead
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert np.allclose(dropout_probabilities(teacher, rows, logits), softened(logits, RETENTION_TEMPERATURE))
    assert np.allclose(dropout_probabilities(teacher, rows, logits, temperature=0.5), softened(logits, 0.5))


@pytest.mark.parametrize("truth", [0.5, 2.0])
def test_a_fitted_temperature_recovers_the_one_that_made_the_labels(truth):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 3))
    p = np.exp(logits / truth) / np.exp(logits / truth).sum(-1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p])
    assert fit_temperature(logits, labels) == pytest.approx(truth, rel=0.15)


def test_a_fitted_temperature_leaves_room_for_error_when_every_shot_is_right():
    logits = np.array([[4.0, 0.0], [0.0, 4.0]] * 5)
    t = fit_temperature(logits, np.array([0, 1] * 5))
    top = 1 / (1 + np.exp(-4.0 / t))
    assert top == pytest.approx(1 - 1 / 12, abs=0.01)  # Laplace: 10 right of 10 reads as 11/12, not certainty


def test_the_estimates_sampling_spread_shrinks_with_rows_and_vanishes_on_agreement():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4000, 2))
    pred = np.where(rng.random(4000) < 0.2, 1 - logits.argmax(-1), logits.argmax(-1))  # 80% agreement
    p = softened(logits)
    small, large = retention_sampling_sd(p[:250], pred[:250]), retention_sampling_sd(p, pred)
    assert 0 < large < small and small / large == pytest.approx(4, rel=0.35)  # ~ 1 / sqrt(rows)
    assert retention_sampling_sd(p, logits.argmax(-1)) == 0.0


def _writer(path: str, k: int, n: int) -> None:
    for i in range(n):
        memory.record({"writer": k, "i": i, "pad": "x" * 3000}, memory.Path(path))


def test_memory_keeps_every_row_of_concurrent_writers(tmp_path):
    path = tmp_path / "recipes.jsonl"
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(str(path), k, 60)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = memory.load(path)
    assert len(rows) == 240 and {(r["writer"], r["i"]) for r in rows} == {(k, i) for k in range(4) for i in range(60)}


def test_memory_prediction_follows_the_nearest_rows():
    task = {"task": "text-classification", "labels": 2, "text_length": 20, "shots": 10}
    recipe = {"layer_fraction": 0.5, "prune": 0.2, "embedding_bits": 8}
    rows = [{**task, "recipe": recipe, "retention": 0.90}] * 3 + [
        {**task, "task": "image-classification", "recipe": recipe, "retention": 0.5}]
    guess, used = memory.predict_retention(rows, task, recipe, prior=0.99)
    assert used == 3 and 0.90 < guess < 0.92  # three exact rows outweigh the prior; other tasks do not count
    assert memory.predict_retention([], task, recipe, prior=0.99) == (pytest.approx(0.99), 0)


def test_the_memory_tells_which_layer_choice_kept_more_on_a_similar_task():
    from fscompile.search import _layers

    task = {"task": "text-classification", "labels": 4, "text_length": 40, "shots": 10}
    spaced = {"layer_fraction": 1 / 3, "layer_choice": "spaced", "prune": 0.2, "embedding_bits": 4}
    selected = {**spaced, "layer_choice": "selected"}
    rows = [{**task, "recipe": spaced, "retention": 0.96}, {**task, "recipe": selected, "retention": 0.98}]
    guess = {c["layer_choice"]: memory.predict_retention(rows, task, c, prior=0.9)[0] for c in (spaced, selected)}
    assert guess["selected"] > guess["spaced"] + 0.005
    assert _layers(2, 6, "spaced") == "2,5" and _layers(2, 6, "selected") == "2"  # a count: the compile chooses


def test_steps_scale_multiplies_the_derived_count_not_an_explicit_one():
    from fscompile.config import DistillConfig

    assert DistillConfig(steps_scale=2.0).resolved().steps == 2000
    assert DistillConfig(steps_scale=2.0).resolved(derived=400).steps == 800  # long inputs: fewer, still doubled
    assert DistillConfig(steps=300, steps_scale=2.0).resolved().steps == 300
    with pytest.raises(ValueError, match="steps_scale must be in"):
        DistillConfig(steps_scale=0)


# a two-label task of short texts, and its fastest candidate (2 of 6 layers, 40% pruned), for the search's choices
TASK = {"task": "text-classification", "labels": 2, "text_length": 20, "shots": 10}
QUICK = {"layers": 2, "layer_choice": "spaced", "steps_scale": 1.0, "prune": 0.4, "embedding_bits": 8,
        "layer_fraction": 1 / 3, "latency_ms": 1.0, "size_mb": 10.0}


def kept(*measured: tuple[dict, float]) -> list[dict]:
    """Recipe-memory rows of TASK: each (candidate, retention) three times."""
    return [{**TASK, "recipe": {k: c[k] for k in ("layer_fraction", "prune", "embedding_bits")}, "retention": r}
            for c, r in measured] * 3


def test_the_search_shifts_predictions_by_the_tasks_level_and_then_looks_for_faster_ones():
    from fscompile.search import _next

    task, fast = TASK, dict(QUICK)
    slow = {**fast, "layers": 4, "prune": 0.0, "layer_fraction": 2 / 3, "latency_ms": 2.0, "size_mb": 20.0}
    # a harder task in memory: every recipe there kept 20 points less than the budget asks
    rows = kept((fast, 0.70), (slow, 0.78))
    budget = Budget(min_retention=0.95)
    assert _next([fast, slow], budget, rows, task, 0.0, None) is slow  # none hopeful: the most retentive
    assert fast["status"].startswith("skipped: predicted retention 0.7")
    # had the slow one measured 0.25 above its prediction, this task is that much easier: the fast one is hopeful
    assert _next([fast, slow], budget, rows, task, 0.25, None) is fast
    assert _next([fast], budget, rows, task, 0.25, slow) is fast  # faster than the winner: tried
    assert _next([fast], budget, rows, task, 0.0, slow) is None  # not expected to meet it: the winner stays
    assert _next([slow], budget, rows, task, 0.25, fast) is None  # slower than the winner: never tried


def test_a_candidate_predicted_to_meet_the_budget_goes_before_a_faster_long_shot():
    from fscompile.search import _next

    fast = QUICK
    slow = {**fast, "layers": 3, "layer_fraction": 0.5, "latency_ms": 2.0}
    winner = {**fast, "latency_ms": 3.0}
    budget = Budget(min_retention=0.95)
    # fast a point short, slow predicted to meet it: slow first, whatever the state of the search
    for calibrated, won in ((False, None), (True, None), (True, winner)):
        pick = _next([dict(fast), dict(slow)], budget, kept((fast, 0.94), (slow, 0.97)), TASK, 0.0, won, calibrated)
        assert pick["layers"] == 3
    # both a point or two short: the fastest before any trial and once one met the budget; after a miss, the
    # most retentive (the likeliest to meet it at all)
    for calibrated, won, layers in ((False, None, 2), (True, winner, 2), (True, None, 3)):
        pick = _next([dict(fast), dict(slow)], budget, kept((fast, 0.94), (slow, 0.95)), TASK, 0.0, won, calibrated)
        assert pick["layers"] == layers and pick["predicted_retention"] < 0.95


def test_the_default_recipe_goes_first_when_its_shape_is_within_the_budget():
    from fscompile.search import _next

    fast = QUICK
    plain = {**fast, "layers": 3, "layer_fraction": 0.5, "prune": 0.2, "latency_ms": 2.0, "default": True}
    budget = Budget(min_retention=0.95)
    # before any trial the default goes first, though slower and predicted short
    rows = kept((fast, 0.97), (plain, 0.90))
    assert _next([dict(fast), dict(plain)], budget, rows, TASK, 0.0, None)["default"]
    # once a trial measured the task's level, the prediction decides again
    assert not _next([dict(fast), dict(plain)], budget, rows, TASK, 0.0, None, calibrated=True).get("default")
    # without a retention limit the fastest shape goes first
    assert not _next([dict(fast), dict(plain)], Budget(max_latency_ms=3.0), rows, TASK, 0.0, None).get("default")


def test_a_shape_that_measured_over_the_latency_drops_its_untried_variants():
    from fscompile.search import _drop_siblings

    shape = {"layers": 3, "prune": 0.0, "embedding_bits": 8, "latency_ms": 2.0, "size_mb": 16.0}
    tried = {**shape, "layer_choice": "spaced", "steps_scale": 2.0, "trial": 1,
             "measured": {"latency_ms": 2.6, "size_mb": 16.0, "peak_mb": None, "retention": 0.99}}
    twin = {**shape, "layer_choice": "selected", "steps_scale": 1.0}
    other = {**shape, "prune": 0.2, "layer_choice": "spaced", "steps_scale": 1.0}
    feasible = [twin, other]
    _drop_siblings(feasible, tried, Budget(max_latency_ms=2.2, min_retention=0.999))  # retention is no shape's
    assert feasible == [other]
    assert twin["status"] == "dropped: its shape measured latency 2.6 ms > 2.2 ms when built (trial 1)"
    _drop_siblings(feasible, {**tried, "prune": 0.2}, Budget(max_latency_ms=3.0))  # within it: kept
    assert feasible == [other]


def test_a_narrow_miss_on_retention_alone_tries_the_shapes_other_layer_choice_next():
    from fscompile.search import _twin

    shape = {"layers": 2, "prune": 0.4, "embedding_bits": 4, "steps_scale": 2.0, "latency_ms": 2.4, "size_mb": 8.6}
    tried = {**shape, "layer_choice": "spaced", "trial": 1,
             "measured": {"latency_ms": 2.35, "size_mb": 8.6, "peak_mb": None, "retention": 0.965}}
    twin = {**shape, "layer_choice": "selected"}
    shorter = {**twin, "steps_scale": 1.0}
    budget = Budget(max_latency_ms=2.5, max_size_mb=9.6, min_retention=0.976)
    assert _twin([shorter, twin], tried, budget) is twin and twin["twin_of"] == 1  # same steps, other layers
    assert _twin([shorter], tried, budget) is None
    # a miss wider than what the layer choice moves, a miss on another limit too, or no miss: the memory decides
    for m in ({"retention": 0.90}, {"latency_ms": 2.6}, {"retention": 0.98}):
        assert _twin([dict(twin)], {**tried, "measured": {**tried["measured"], **m}}, budget) is None


def test_of_trials_as_fast_as_the_fastest_that_met_the_budget_the_most_retentive_ships():
    from fscompile.search import _winner

    def trial(n: int, ms: float, retention: float | None) -> dict:
        return {"trial": n, "measured": {"latency_ms": ms, "retention": retention}}

    # run 11's SST-2 tight search: 40% pruned was 3% faster than 20% pruned and kept 0.8 points less
    first, kept_more, fastest = trial(1, 2.84, 0.929), trial(2, 2.79, 0.936), trial(3, 2.70, 0.928)
    assert _winner([first, kept_more, fastest]) is kept_more  # the first is 5.2% slower: not tied
    assert _winner([first, {**kept_more, "measured": {"latency_ms": 2.85, "retention": 0.936}}, fastest]) is fastest
    assert _winner([trial(1, 2.79, None), trial(2, 2.70, None)])["trial"] == 2  # no estimate: the fastest
    assert _winner([]) is None


def test_once_one_met_the_budget_trials_left_go_to_as_fast_candidates_predicted_to_keep_more():
    from fscompile.search import _next, _tied

    met = {**QUICK, "latency_ms": 2.0, "trial": 1, "measured": {"latency_ms": 2.0, "retention": 0.95}}
    tied = {**QUICK, "prune": 0.2, "latency_ms": 2.08}  # 4% slower
    slower = {**QUICK, "layers": 3, "layer_fraction": 0.5, "latency_ms": 2.2}  # 10% slower
    budget = Budget(min_retention=0.94)
    rows = kept((tied, 0.97), (slower, 0.99))
    assert _next([dict(tied), dict(slower)], budget, rows, TASK, 0.0, met, calibrated=True) is None  # none faster
    pick = _tied([dict(tied), dict(slower)], [met], budget, rows, TASK, 0.0)
    assert pick["prune"] == 0.2 and pick["tied_with"] == 1
    # predicted to keep less than half a point more than the trial that met it, or no retention limit: none
    assert _tied([dict(tied)], [met], budget, rows, TASK, -0.016) is None
    assert _tied([dict(tied)], [met], Budget(max_latency_ms=3.0), rows, TASK, 0.0) is None
    assert _tied([dict(tied)], [], budget, rows, TASK, 0.0) is None


def test_with_none_expected_to_meet_it_a_shape_timed_within_the_latency_limit_goes_first():
    from fscompile.search import _next

    fast = QUICK
    slow = {**fast, "layers": 3, "layer_fraction": 0.5, "latency_ms": 2.6}  # over a 2.5 ms limit by less than LATENCY_SLACK
    rows = kept((fast, 0.90), (slow, 0.93))
    # both far short: the more retentive is slower than the limit, so the one timed within it goes first
    assert _next([dict(fast), dict(slow)], Budget(max_latency_ms=2.5, min_retention=0.99), rows, TASK, 0.0, None)[
        "layers"] == 2
    assert _next([dict(fast), dict(slow)], Budget(max_latency_ms=2.7, min_retention=0.99), rows, TASK, 0.0, None)[
        "layers"] == 3


def test_a_shapes_figure_is_the_lower_of_two_timing_passes(tiny_teacher, tmp_path, monkeypatch):
    """Noise on a shared host only adds time: a pass that ran in a busy minute does not reach the figure
    a shape is kept or dropped on."""
    import fscompile.profile as profile
    from fscompile.config import CompileConfig
    from fscompile.pipeline import resolve_backend
    from fscompile.tasks.text import probe_shapes

    passes, real = [], profile.in_turns

    def busy_first(runs, **kw):  # the real timing; the first pass as if the host were busy: 100 ms more each
        ms = real(runs, **kw)
        passes.append(ms)
        return [m + 100 for m in ms] if len(passes) == 1 else ms

    monkeypatch.setattr(profile, "in_turns", busy_first)
    cfg = CompileConfig(teacher=str(tiny_teacher), target="ort-int8", shots=3, seq_len=16)
    _, shapes, _ = probe_shapes(cfg, resolve_backend(cfg), lambda n: [(1, 0.0, 8), (2, 0.0, 8)], tmp_path,
                                lambda *a: None)
    assert len(passes) == 2 and [s["latency_ms"] for s in shapes] == passes[1]


def test_a_budget_no_recipe_meets_fails_before_training(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FSCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(tiny_teacher), "--out", str(out), "--max-latency-ms", "0.0001", *FAST])
    assert r.exit_code == 6, r.output
    line = r.output.strip().splitlines()[-1]
    assert "no recipe can meet the budget (latency ≤ 0.0001 ms)" in line and "closest: 1 layers" in line
    assert "Traceback" not in r.output and not out.exists() and not list(tmp_path.glob(".out*"))
    assert memory.load() == []  # nothing was distilled or built


def test_a_peak_memory_budget_is_probed_before_training(tiny_teacher, tmp_path, monkeypatch):
    """--max-peak-mb: each shape is served once in a fresh process and its peak memory checked before
    any distillation (no process serving an ONNX model fits in 1 MB)."""
    monkeypatch.setenv("FSCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(tiny_teacher), "--out", str(out), "--max-peak-mb", "1", *FAST])
    assert r.exit_code == 6, r.output
    line = r.output.strip().splitlines()[-1]
    assert "no recipe can meet the budget (peak memory ≤ 1 MB)" in line and " MB, peak " in line, line
    assert not out.exists() and memory.load() == []


def test_a_budget_only_the_teacher_meets_picks_it(tiny_opinionated, tmp_path, monkeypatch):
    monkeypatch.setenv("FSCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    import fscompile.tasks.text as text

    reads = []  # the real reading, counted: the trials share one teacher on the same rows
    real = text.dropout_probabilities
    monkeypatch.setattr(text, "dropout_probabilities", lambda *a, **k: reads.append(1) or real(*a, **k))
    # no --steps: the derived count lets the search offer 2x steps too (the teacher itself trains none)
    r = CliRunner().invoke(main, [str(tiny_opinionated), "--out", str(out), "--target", "ort-fp32",
                                  "--min-retention", "0.99", "--max-latency-ms", "1000", "--json", *FAST[2:]])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    # the default recipe first, as a plain compile; it misses, and the teacher is the only one left in reach
    assert m["search"]["winner"] == "4 layers, prune 0, 8-bit table" and m["search"]["trials"] == 2
    assert m["student"]["layers_kept"] == [0, 1, 2, 3] and m["distillation"]["steps"] == 0
    assert len(reads) == 1  # read with its dropout on once, for both trials
    search = json.loads((out / "search.json").read_text())
    status = {(c["layers"], c["layer_choice"], c["prune"], c["embedding_bits"], c["steps_scale"]): c["status"]
              for c in search["candidates"]}
    assert status[(4, "spaced", 0.0, 8, 1.0)] == "meets the budget" and (4, "selected", 0.0, 8, 1.0) not in status
    assert status[(2, "spaced", 0.2, 8, 1.0)].startswith("trained, missed: retention")
    assert status[(2, "selected", 0.2, 8, 1.0)].startswith("skipped: predicted retention")
    assert status[(2, "spaced", 0.2, 8, 2.0)].startswith("skipped: predicted retention")
    for c in (c for c in search["candidates"] if "measured" in c):  # checked in the shapes' frame
        got = c["measured"]
        assert got["latency_ms"] == pytest.approx(c["latency_ms"] * got["built_over_shape"])
        assert got["latency_ms_profiled"] > 0 and "probe" not in c
    scales = {(c["layers"], c["steps_scale"]) for c in search["candidates"]}
    assert (2, 2.0) in scales and (2, 1.0) in scales and (4, 2.0) not in scales  # the teacher is not trained
    assert "## Budget search" in (out / "report.md").read_text() and (out / "pareto.png").is_file()
    rows = memory.load()
    assert [r["recipe"]["layers"] for r in rows] == [2, 4] and rows[1]["retention_estimate"] >= 0.99
    assert rows[0]["recipe"]["layer_choice"] == "spaced" and rows[0]["retention_estimate"] < 0.99
    # the same search may write there again; another budget may not without --force
    from fscompile.errors import InputError
    from fscompile.outdir import check_out

    check_out(out, m["search"]["fingerprint"], force=False)
    with pytest.raises(InputError, match="already holds a different run"):
        check_out(out, "0123456789ab", force=False)


def test_budget_flags_refuse_a_fixed_recipe(tiny_teacher, tmp_path):
    r = CliRunner().invoke(main, [str(tiny_teacher), "--out", str(tmp_path / "o"), "--max-size-mb", "5",
                                  "--prune", "0.3", *FAST])
    assert r.exit_code == 3 and "chooses --student-layers and --prune itself" in r.output
    r = CliRunner().invoke(main, [str(tiny_teacher), "--max-latency-ms", "-1", *FAST])
    assert r.exit_code == 2 and "--max-latency-ms must be a positive number" in r.output
