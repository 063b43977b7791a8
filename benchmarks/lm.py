"""Text generation through fscompile on a pretrained LLM: SmolLM2-135M-Instruct (the packaged GGUF,
alias ``smollm2``) distilled from N passages of Wikipedia (issue 19).

    python benchmarks/lm.py --shots 10 --seeds 1 --steps 150 --batch-size 8 --out bench-out/lm-smollm2

The passages are the paragraphs of ../shared/data/squad_v1.1 (48 Wikipedia articles): the articles are
cut in two (seeded), shots come from one half and perplexity is measured on paragraphs of the other.
Per draw, one distillation (fscompile's own stages), then:
  fscompile artifact   the compile as the pipeline ships it (its own choice of INT8 / 4-bit variant)
  student ORT <v>      the same student built as each variant: dynamic INT8, 4-bit weight-only
  (e) no training      the derived student as initialised from the teacher's blocks
  teacher ORT <v>      the teacher itself quantized the same two ways (no distillation)
Perplexity, next-token accuracy and top-1 agreement with the teacher on the held-out paragraphs; size;
one generated token with 127 cached (ms, and tokens/s) at batch 1. Writes results.jsonl, table.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, Results

VARIANTS = ("dynamic-per-channel", "weight-only-int4")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--squad", default=str(SHARED / "data/squad_v1.1/dev-v1.1.json"))
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="fscompile --steps (default: derived from the teacher)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--student-layers", default=None)
    p.add_argument("--max-eval", type=int, default=150)
    p.add_argument("--no-peers", action="store_true", help="skip the quantized-teacher rows")
    p.add_argument("--out", default=str(REPO / "bench-out/lm-smollm2"))
    return p.parse_args()


def write_passages(squad: Path, root: Path, seed: int = 0) -> Path:
    """Paragraphs of half the articles -> root/train.txt, of the others -> root/dev.txt."""
    data = json.loads(squad.read_text())["data"]
    order = np.random.default_rng(seed).permutation(len(data))
    root.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train.txt", order[: len(order) // 2]), ("dev.txt", order[len(order) // 2:])):
        paras = [" ".join(p["context"].split()) for i in sorted(idx) for p in data[i]["paragraphs"]]
        (root / name).write_text("\n\n".join(paras) + "\n")
    return root


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    from fscompile.backends.onnxruntime import OrtRunner, dynamic_int8, weight_only_int4
    from fscompile.config import CompileConfig, DistillConfig
    from fscompile.models.lm import derive_lm_student
    from fscompile.pipeline import build, distill_stage, resolve_backend
    from fscompile.profile import ProfileRequest, cpu_info, profile_model
    from fscompile.tasks import get_task

    out = Path(args.out)
    results = Results(out)
    passages = write_passages(Path(args.squad), out / "passages")
    cpu = cpu_info()

    def progress(stage: str, done: int, total: int, detail: str = "") -> None:
        if done == total or done % 25 == 0:
            print(f"  {stage} {done}/{total} {detail}", file=sys.stderr, flush=True)

    for seed in range(args.seeds):
        cfg = CompileConfig(teacher=args.teacher, data=str(passages), shots=args.shots, seed=seed,
                            max_eval=args.max_eval, student_layers=args.student_layers, profile_seconds=2.0,
                            distill=DistillConfig(steps=args.steps, batch_size=args.batch_size))
        task = get_task(cfg)
        backend = resolve_backend(cfg)
        start = time.perf_counter()
        d = distill_stage(cfg, backend, progress)
        with tempfile.TemporaryDirectory(prefix="fscompile-lm-bench-") as tmp_s:
            tmp = Path(tmp_s)
            m = build(d, backend, cfg, tmp / "run", progress, start)
            compile_s = time.perf_counter() - start
            ref = task.predictions(d, None, d.teacher)
            vocab, length, _ = task.input_size(d, cfg)
            base = {"seed": seed, "shots": args.shots, "teacher": args.teacher, "cpu": cpu["model"],
                    "layers_kept": d.keep, "steps": d.stats.steps, "batch_size": cfg.distill.batch_size}

            def decode(path: Path) -> dict:
                prof = profile_model(ProfileRequest("onnx", str(path), vocab, length, budget_s=2.0))
                ms = prof["decode"]["batch1"]["p50_ms"]
                return {"decode_ms": ms, "tokens_per_s": 1000 / ms, "peak_rss_mb": prof.get("peak_rss_mb"),
                        "prompt_b1_ms": prof["batch1"]["p50_ms"]}

            for who in ("teacher", "student", "artifact"):
                prof = m["profile"][who]
                dec = prof.get("decode", {}).get("batch1", {}).get("p50_ms")
                results.record({**base, "method": f"fscompile {who}", **m["metrics"][who],
                                "size_mb": m["size_mb"][who], "prompt_b1_ms": prof["batch1"]["p50_ms"],
                                "decode_ms": dec, "tokens_per_s": 1000 / dec if dec else None,
                                "peak_rss_mb": prof.get("peak_rss_mb"), "compile_s": compile_s,
                                "variant": m["artifact"].get("variant"), "timings": m["timings_s"],
                                "candidates": m["artifact"].get("candidates"),
                                "layer_selection": m["student"].get("layer_selection"),
                                "best_step": m["distillation"].get("best_step")})
            cal = task.calibration(d, cfg)
            for variant in VARIANTS:
                art = backend.compile(d.student, cal, tmp / variant, dataclasses.replace(cfg.recipe(), variant=variant))
                path = art.path / art.model_file
                scores = task.predictions(d, backend.load(art), d.student)
                results.record({**base, "method": f"student ORT {variant}", **task.score(d, scores, ref),
                                "size_mb": path.stat().st_size / 2**20, **decode(path)})
            init = derive_lm_student(d.teacher, d.keep)
            results.record({**base, "method": "(e) kept blocks, no training",
                            **task.score(d, task.predictions(d, None, init), ref)})
            del init
            if not args.no_peers:
                raw = tmp / "teacher.onnx"
                d.teacher.export_onnx(raw)
                for variant, quantize in (("dynamic-per-channel", lambda s, t: dynamic_int8(s, t, fused=False)),
                                          ("weight-only-int4", weight_only_int4)):
                    q = quantize(raw, tmp / f"teacher-{variant}.onnx")
                    scores = task.predictions(d, OrtRunner(q), d.teacher)
                    results.record({**base, "method": f"teacher ORT {variant}", **task.score(d, scores, ref),
                                    "size_mb": q.stat().st_size / 2**20, **decode(q)})
    summarise(results.rows, out)


def summarise(rows: list[dict], out: Path) -> None:
    order = ["fscompile teacher", "teacher ORT dynamic-per-channel", "teacher ORT weight-only-int4",
             "fscompile artifact", "student ORT dynamic-per-channel", "student ORT weight-only-int4",
             "fscompile student", "(e) kept blocks, no training"]
    t_ppl = np.mean([r["perplexity"] for r in rows if r["method"] == "fscompile teacher"])
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"{r0['teacher']} on Wikipedia paragraphs (SQuAD v1.1 dev, articles halved): {r0['shots']} shot "
             f"paragraphs, perplexity on {r0['n']} paragraphs of the other articles (128-token windows); draws "
             f"{seeds}; student keeps {len(r0['layers_kept'])} blocks {r0['layers_kept']}; {r0['steps']} steps, "
             f"batch {r0['batch_size']}; CPU {r0['cpu']}.", "",
             "| model | perplexity | × teacher | next-token acc | top-1 agreement | MB | decode ms (tok/s) |",
             "|---|---|---|---|---|---|---|"]
    for method in order:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        ppl = [r["perplexity"] for r in rs]
        size = [r["size_mb"] for r in rs if r.get("size_mb") is not None]
        dec = [r["decode_ms"] for r in rs if r.get("decode_ms")]
        name = method + (f" ({rs[0]['variant']})" if method == "fscompile artifact" else "")
        ppl_s = f"{np.mean(ppl):.2f}" + (f" ± {np.std(ppl):.2f}" if len(rs) > 1 else "")
        mb = f"{np.mean(size):.1f}" if size else "—"
        dec_s = f"{np.mean(dec):.2f} ({1000 / np.mean(dec):.0f})" if dec else "—"
        lines.append(f"| {name} | {ppl_s} | {np.mean(ppl) / t_ppl:.2f} | {np.mean([r['accuracy'] for r in rs]):.4f} "
                     f"| {np.mean([r['agreement'] for r in rs]):.3f} | {mb} | {dec_s} |")
    art = [r for r in rows if r["method"] == "fscompile artifact"]
    if art:
        lines += ["", f"Compile {np.mean([r['compile_s'] for r in art]):.0f} s per draw (stages: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in art[0]["timings"].items() if k != "total") + ")."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
