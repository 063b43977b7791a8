"""Text generation through fscompile (issue 6): a GPT-2 teacher trained here, distilled from N passages.

    python benchmarks/lm.py --seeds 3 --shots 10 --steps 300 --out bench-out/lm

No pretrained GPT-2 is reachable offline, so the teacher is a GPT-2 (6 blocks, 256 wide, its own
byte-level BPE vocabulary) trained here on the AG News train subset in ../shared/data. The shots
are passages of AG News *test* (which the teacher never saw; the other half of it is the
evaluation set, held out by fscompile). Per draw, on the same passages:
  fscompile           3 of 6 blocks kept (every other), KD on next-token distributions over the
                      passages + teacher samples, hidden matching, ORT INT8 artifact
  (a) LM fine-tune    the same derived student trained on the passages alone (no teacher)
  (b) KD, passages    the same student, next-token KD on the passages only (no teacher samples)
  (e) no training     the derived student as initialised from the teacher's blocks
  (c) teacher, (d) teacher ORT dynamic INT8
Writes results.jsonl, table.md and table.json.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, Results


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=str(SHARED / "data/ag_news/train_subset_8000.csv"))
    p.add_argument("--data", default=str(SHARED / "data/ag_news/test.csv"))
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-eval", type=int, default=400)
    p.add_argument("--out", default=str(REPO / "bench-out/lm"))
    return p.parse_args()


def train_teacher(train_csv: Path, out: Path, steps: int, length: int = 64) -> dict:
    """BPE tokenizer (8k) + GPT-2 (6 x 256) trained from scratch with the LM loss: AdamW 6e-4,
    batch 32 windows of <= 64 tokens, warmup then linear decay. Cached in ``out``."""
    if (out / "train.json").is_file():
        return json.loads((out / "train.json").read_text())
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [" ".join(r["content"].replace("\\", " ").split()) for r in csv.DictReader(train_csv.open())]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=8192, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    eos = tok.eos_token_id
    ids = [x + [eos] for x in tok(texts)["input_ids"]]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=256, n_layer=6, n_head=4,
                                       bos_token_id=eos, eos_token_id=eos))
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    warm = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warm, max(0.05, 1 - k / steps)))
    gen = np.random.default_rng(0)
    model.train()
    t = time.perf_counter()
    for step in range(steps):
        rows = [ids[i][:length] for i in gen.integers(len(ids), size=32)]
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = x.masked_fill(mask == 0, -100)
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"teacher step {step}/{steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"teacher_steps": steps, "teacher_train_s": time.perf_counter() - t, "teacher_passages": len(texts),
            "teacher_params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    (out / "train.json").write_text(json.dumps(info))
    return info


def lm_finetune(student, shots: list[list[int]], steps: int, seed: int, lr: float = 5e-5) -> None:
    """Baseline (a): the LM loss on the shot windows alone, same optimiser settings as fscompile."""
    import torch

    from fscompile.tasks.lm import _batch

    torch.manual_seed(seed)
    model = student.module
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=lr, weight_decay=0.01)
    gen = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        idx = gen.integers(len(shots), size=min(16, len(shots))).tolist()
        b = _batch(shots, idx, student.tokenizer.pad_token_id)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model.hf(**b, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    from fscompile.backends.onnxruntime import OrtRunner, dynamic_int8

    import fscompile
    from fscompile.config import DistillConfig
    from fscompile.data.lm import load_lm_task
    from fscompile.models.lm import derive_lm_student, load_lm_teacher
    from fscompile.tasks.lm import (
        TokenTransfer,
        distill_lm,
        lm_metrics,
        token_scores,
        torch_lm_runner,
        windows,
    )

    out = Path(args.out)
    results = Results(out)
    rows, record = results.rows, results.record
    teacher_dir = out / "teacher"
    info = train_teacher(Path(args.train), teacher_dir, args.teacher_steps)
    teacher = load_lm_teacher(str(teacher_dir))
    with tempfile.TemporaryDirectory(prefix="fscompile-lm-") as tmp:
        raw, q = Path(tmp) / "teacher.onnx", Path(tmp) / "teacher-int8.onnx"
        teacher.export_onnx(raw)
        dynamic_int8(raw, q, fused=False)
        for seed in range(args.seeds):
            task = load_lm_task(args.data, args.shots, seed, args.max_eval)
            ev = windows(teacher, [e.text for e in task.eval], 128)
            ref = token_scores(torch_lm_runner(teacher), teacher, ev)

            def rec(method: str, scores, **extra) -> None:
                record({"seed": seed, "shots": args.shots, "method": method, **info,
                        **lm_metrics(scores, ev, ref), **extra})

            rec("(c) teacher", ref, size_mb=sum(p.stat().st_size for p in teacher_dir.glob("*.safetensors")) / 2**20)
            rec("(d) teacher ORT dynamic INT8", token_scores(OrtRunner(q), teacher, ev), size_mb=q.stat().st_size / 2**20)
            t = time.perf_counter()
            m = fscompile.compile(str(teacher_dir), data=args.data, shots=args.shots, seed=seed, steps=args.steps,
                                  max_eval=args.max_eval, out=Path(tmp) / "run", force=True)
            compile_s = time.perf_counter() - t
            for who in ("student", "artifact"):
                met = m["metrics"][who]
                prof = m["profile"][who]
                record({"seed": seed, "shots": args.shots, "method": f"fscompile {who}", **info, **met,
                        "size_mb": m["size_mb"][who], "b1_ms": prof["batch1"]["p50_ms"],
                        "decode_ms": prof.get("decode", {}).get("batch1", {}).get("p50_ms"),
                        "layers_kept": m["student"]["layers_kept"], "compile_s": compile_s,
                        "timings": m["timings_s"]})
            keep = m["student"]["layers_kept"]
            shots = windows(teacher, [e.text for e in task.shots], 128)
            base = derive_lm_student(teacher, keep)
            rec("(e) kept blocks, no training", token_scores(torch_lm_runner(base), base, ev))
            a = copy.deepcopy(base)
            lm_finetune(a, shots, args.steps, seed)
            rec("(a) LM fine-tune on passages", token_scores(torch_lm_runner(a), a, ev))
            b = copy.deepcopy(base)
            distill_lm(teacher, b, TokenTransfer(shots, ["shot"] * len(shots)), keep,
                       DistillConfig(steps=args.steps, evals=0), seed)
            rec("(b) KD on passages only", token_scores(torch_lm_runner(b), b, ev))
    summarise(rows, out, args)


def summarise(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    order = ["(c) teacher", "(d) teacher ORT dynamic INT8", "fscompile artifact", "fscompile student",
             "(b) KD on passages only", "(a) LM fine-tune on passages", "(e) kept blocks, no training"]
    t_ppl = np.mean([r["perplexity"] for r in rows if r["method"] == "(c) teacher"])
    r0 = rows[0]
    lines = [f"AG News: teacher GPT-2 ({r0['teacher_params_m']:.1f} M parameters, 6 blocks) trained here on "
             f"{r0['teacher_passages']} train passages ({r0['teacher_steps']} steps); {args.shots} shot passages from "
             f"AG News test, perplexity on {r0['n']} held-out test passages; seeds 0-{args.seeds - 1}; "
             f"students keep 3 of 6 blocks.", "",
             "| method | perplexity (mean ± std) | × teacher ppl | next-token acc | top-1 agreement | MB |",
             "|---|---|---|---|---|---|"]
    table = []
    for method in order:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        ppl = [r["perplexity"] for r in rs]
        size = [r["size_mb"] for r in rs if r.get("size_mb") is not None]
        row = {"method": method, "perplexity": float(np.mean(ppl)), "perplexity_std": float(np.std(ppl)),
               "ratio_to_teacher": float(np.mean(ppl) / t_ppl), "accuracy": float(np.mean([r["accuracy"] for r in rs])),
               "agreement": float(np.mean([r["agreement"] for r in rs])), "size_mb": float(np.mean(size)) if size else None,
               "n": len(rs)}
        table.append(row)
        mb = "—" if row["size_mb"] is None else f"{row['size_mb']:.1f}"
        lines.append(f"| {method} | {row['perplexity']:.2f} ± {row['perplexity_std']:.2f} | {row['ratio_to_teacher']:.2f} "
                     f"| {row['accuracy']:.4f} | {row['agreement']:.3f} | {mb} |")
    art = [r for r in rows if r["method"] == "fscompile artifact"]
    if art:
        lines += ["", f"fscompile compile time {np.mean([r['compile_s'] for r in art]):.0f} s per draw; artifact "
                      f"b1 prompt latency (128 tokens) {np.mean([r['b1_ms'] for r in art]):.2f} ms, one generated token "
                      f"with 127 cached {np.mean([r['decode_ms'] for r in art]):.2f} ms."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
