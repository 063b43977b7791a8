"""manifest.json and report.md: one table comparing teacher, student and artifact."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROWS = (("teacher", "teacher (PyTorch fp32)"), ("student", "student (PyTorch fp32)"),
        ("artifact", "artifact"))


@contextlib.contextmanager
def figure(path: Path, xlabel: str, ylabel: str, title: str) -> Iterator[Any]:
    """A latency-vs-quality plot in the house style: yields the axes, saves ``path`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as JSON lines under an exclusive lock: parallel writers share one file."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in rows))
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def table_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model with the figures every report shows."""
    rows = []
    t_b1 = m["profile"]["teacher"]["batch1"]["p50_ms"]
    for key, label in ROWS:
        met, prof = m["metrics"][key], m["profile"][key]
        if key == "artifact":
            label = f"artifact ({m['target']['name']}, {m['artifact'].get('variant', m['target']['precision'])})"
        rows.append({
            "model": label,
            "accuracy": met["accuracy"], "macro_f1": met[HEADLINE.get(m.get("task", ""), DEFAULT_HEADLINE)[1][1]],
            "agreement": met.get("agreement"),
            "params_m": m["parameters"][key] / 1e6, "size_mb": m["size_mb"][key],
            "compression": m["size_mb"]["teacher"] / m["size_mb"][key],
            "b1_p50": prof["batch1"]["p50_ms"], "b1_p90": prof["batch1"]["p90_ms"],
            "b1_p99": prof["batch1"]["p99_ms"], "b8_p50": prof["batch8"]["p50_ms"],
            "throughput": prof["batch8"]["throughput_per_s"], "speedup": t_b1 / prof["batch1"]["p50_ms"],
            "peak_mb": prof["peak_rss_mb"],
        })
    return rows


HEADER = ("| model | {acc} | {f1} | agree | params (M) | MB | × smaller | b1 p50/p90/p99 ms "
          "| b8 p50 ms | samples/s (b8) | × faster (b1) | peak RSS MB |")


# The two headline metrics per task: (shown name, key in the metrics) each.
HEADLINE = {"question-answering": (("EM", "accuracy"), ("F1", "macro_f1")),
            "text-generation": (("next-token acc", "accuracy"), ("perplexity", "perplexity"))}
DEFAULT_HEADLINE = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"))


def metric_names(m: dict[str, Any]) -> tuple[str, str]:
    """The two headline metrics' names: accuracy and macro-F1, SQuAD's EM and F1 for QA,
    next-token accuracy and perplexity for text generation."""
    first, second = HEADLINE.get(m.get("task", ""), DEFAULT_HEADLINE)
    return first[0], second[0]


def verification_lines(v: dict[str, Any] | None) -> list[str]:
    """Plain statements of whether the target got faster and stayed accurate."""
    if not v:
        return []
    c = v["checks"]
    out = ["", "## Verification", ""]
    f = c["faster_than_student"]
    out.append(f"- {'PASS' if f['ok'] else 'FAIL'}: artifact {f['artifact_ms']:.2f} ms vs fp32 student "
               f"{f['student_fp32_ms']:.2f} ms at batch 1, measured on {f['measured_on']}.")
    a = c["accuracy_within_tolerance"]
    out.append(f"- {'PASS' if a['ok'] else 'FAIL'}: accuracy lost against the fp32 student {a['loss']:+.4f} "
               f"(tolerance {a['tolerance']:.4f}).")
    if "pruning_pays" in c:
        p = c["pruning_pays"]
        out.append(f"- {'PASS' if p['ok'] else 'FAIL'}: pruned artifact {p['pruned_ms']:.2f} ms vs the same "
                   f"artifact unpruned {p['unpruned_ms']:.2f} ms"
                   + ("" if p["ok"] else ": the sparsity bought nothing on this device; consider --prune 0") + ".")
    if v.get("fallback"):
        out.append(f"- Fallback: {v['fallback']}.")
    elif v["failed"]:
        out.append("- Verification failed; --fallback would ship the better variant instead.")
    return out


def render_markdown(m: dict[str, Any]) -> str:
    cfg, data = m["config"], m["data"]
    lines = [
        f"# fscompile report: {cfg['teacher']} → {m['target']['name']}",
        "",
        f"{cfg['shots']} {'passages' if m.get('task') == 'text-generation' else 'shots per class'} from `{data['source']}` ({data['shot_split']}, seed {cfg['seed']}); "
        f"metrics on {data['eval_rows']} rows of {data['eval_split']}; latency at input size "
        f"{data.get('input_length', cfg['seq_len'])}, {m['profile']['artifact']['threads']} threads on {m['device']['cpu']['model']}.",
        "",
        HEADER.format(acc=metric_names(m)[0], f1=metric_names(m)[1]),
        "|" + "---|" * 12,
    ]
    for r in table_rows(m):
        agree = "—" if r["agreement"] is None else f"{r['agreement']:.3f}"
        lines.append(
            f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {agree} | {r['params_m']:.1f} "
            f"| {r['size_mb']:.1f} | {r['compression']:.1f} | {r['b1_p50']:.1f} / {r['b1_p90']:.1f} / "
            f"{r['b1_p99']:.1f} | {r['b8_p50']:.1f} | {r['throughput']:.0f} | {r['speedup']:.2f} "
            f"| {r['peak_mb']:.0f} |")
    art = m["artifact"]
    t_acc = m["metrics"]["teacher"]["accuracy"]
    lines += [
        "",
        f"- Student: teacher layers {m['student']['layers_kept']} kept; "
        f"{m['distillation']['steps']} distillation steps"
        + (f" (peak lr {m['distillation']['lr']:g})" if m["distillation"].get("lr") else "")
        + f" on {m['distillation']['transfer_size']} transfer "
        f"examples ({', '.join(f'{k}: {v}' for k, v in m['distillation']['transfer_origin'].items())}).",
        f"- Artifact keeps {m['metrics']['artifact']['accuracy'] / t_acc:.1%} of the teacher's {metric_names(m)[0]}."
        if t_acc else "- Teacher accuracy is 0.",
    ]
    parts = []
    if data.get("dropped"):
        parts.append("left out " + ", ".join(f"{n} {k}" for k, n in data["dropped"].items()))
    parts += [f"label {a!r} read as {b!r}" for a, b in (data.get("labels_merged") or {}).items()]
    if parts:
        lines.append(f"- Data: {'; '.join(parts)}.")
    src = m["distillation"].get("sources") or {}
    if src:
        learnt = [f"{src.get('shot', 0)} labelled shots", f"{src.get('augmented', 0)} augmented variants"]
        if src.get("generator"):
            g = src["generator"]
            took = "read from the cache" if g["cached"] else f"{g['seconds']:.0f} s"
            learnt.append(f"{src.get('generated', 0)} texts generated by {g['name']} ({g['kept']} kept of "
                          f"{g['sampled']} written, {took})")
        if src.get("unlabeled"):
            learnt.append(f"{src['unlabeled']} unlabelled texts (`--unlabeled`)")
        lines.append(f"- The student learnt from: {'; '.join(learnt)}.")
    if m.get("task") == "text-classification" and "unlabeled" not in m["distillation"]["transfer_origin"]:
        # the largest lever measured (benchmarks/results/README.md), and easy to miss
        lines.append("- No `--unlabeled` text. Real unlabelled text helps most, in-domain best but any text in the "
                     "teacher's language too (a file or a Hub dataset).")
    if m["teacher"].get("adaptation"):
        a = m["teacher"]["adaptation"]
        lines.append(f"- Teacher had no task head: fitted one ({a['method']}; leave-one-out accuracy on the "
                     f"shots {a['cv_accuracy']:.3f}, optimistic since the body was tuned on them).")
    if m["student"].get("prepare"):
        lines.append(f"- Sparsity: {json.dumps(m['student']['prepare'])}.")
    mets = m["metrics"]
    if "has_answer_f1" in mets["teacher"] and "no_answer_accuracy" in mets["teacher"]:
        lines.append("- SQuAD 2.0 breakdown (teacher / student / artifact): F1 on the "
                     f"{mets['teacher']['has_answer_n']} answerable questions "
                     + " / ".join(f"{mets[k]['has_answer_f1']:.4f}" for k, _ in ROWS)
                     + f"; abstained on the {mets['teacher']['no_answer_n']} unanswerable ones "
                     + " / ".join(f"{mets[k]['no_answer_accuracy']:.4f}" for k, _ in ROWS) + ".")
    dist = m["distillation"]
    kept = [c for c in dist.get("validation", []) if c["step"] == dist.get("best_step") and "threshold" in c]
    if kept:
        lines.append(f"- No-answer threshold of the student and artifact: {kept[0]['threshold']:+.3f} (tuned on "
                     f"held-out questions, F1 against the teacher's answers there {kept[0]['f1']:.4f}; "
                     "in model/config.json as `null_score_diff_threshold`).")
    decode = m["profile"]["artifact"].get("decode")
    if decode:
        lines.append(f"- Generation from the artifact (key/value cache): one new token after {decode['past_len']} "
                     f"tokens takes {decode['batch1']['p50_ms']:.2f} ms at batch 1 (p50).")
    if "variant" in art:
        cands = "; ".join(f"{k}: agreement {v['agreement']:.3f}, {v['b1_p50_ms']:.1f} ms, {v['size_mb']:.1f} MB"
                          for k, v in art["candidates"].items())
        lines.append(f"- INT8 variant kept: **{art['variant']}** ({art['selection']}). Candidates: {cands}. "
                     f"{art['calibration_samples']} samples calibrated the static candidate.")
    if art.get("fusion_skipped"):
        lines.append(f"- Attention fusion skipped: {art['fusion_skipped']}")
    lines += verification_lines(m.get("verification"))
    t = m["timings_s"]
    labelling = dist.get("teacher_seconds")
    lines += ["", "Compile time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
              + (f" (of distill, the teacher labelling the transfer set: {labelling:.1f})" if labelling else ""), ""]
    return "\n".join(lines)
