"""What a 4-bit word table costs in latency and saves in size: one untrained student shape (no
distillation: weights change neither), compiled with dynamic INT8 at 8- and 4-bit tables, timed in turns
(``profile.in_turns``, as the search times shapes) ``--times`` times, with the embedding ops each build holds.

    python benchmarks/embedding_bits.py --layers 2,5 --prune 0.2
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import tempfile
from pathlib import Path

from common import REPO, SHARED


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(SHARED / "teachers/minilm-sst2"))
    p.add_argument("--data", default=str(SHARED / "data/glue_sst2"))
    p.add_argument("--layers", default="2,5", help="teacher layers the student keeps")
    p.add_argument("--prune", type=float, default=0.2)
    p.add_argument("--times", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import onnx

    from fscompile.config import CompileConfig
    from fscompile.outdir import dir_mb
    from fscompile.pipeline import resolve_backend
    from fscompile.profile import in_turns, synthetic_inputs
    from fscompile.tasks.text import TransferSet, calibration_set, derive_student, load_data, load_teacher

    cfg = CompileConfig(teacher=args.teacher, data=args.data, target="ort-int8", shots=10, prune=args.prune)
    backend = resolve_backend(cfg)
    task = load_data(cfg)
    teacher = load_teacher(cfg.teacher, task.label_names)
    shots = TransferSet([e.text for e in task.shots], None, ["shot"] * len(task.shots))
    runs, builds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4):
            rcfg = dataclasses.replace(cfg, embedding_bits=bits)
            student, _ = derive_student(teacher, [int(i) for i in args.layers.split(",")])
            student = backend.prepare(student, rcfg.recipe())
            cal = calibration_set(student, shots, rcfg, n_calibrate=8, n_validate=8)
            art = backend.compile(student, cal, Path(tmp) / f"bits{bits}",
                                  dataclasses.replace(rcfg.recipe(), variant="dynamic-per-channel"))
            graph = onnx.load(str(art.path / art.model_file), load_external_data=False).graph
            ops = collections.Counter(n.op_type for n in graph.node if "Gather" in n.op_type or "Embed" in n.op_type)
            builds.append(f"{bits}-bit table: {dir_mb(art.path, '*.onnx'):.2f} MB, embedding ops {dict(ops)}")
            feed = synthetic_inputs(student.input_names, 1, args.seq_len, teacher.tokenizer.vocab_size)
            runs.append(lambda run=backend.load(art), feed=feed: run(feed))
        print("\n".join(builds))
        for _ in range(args.times):
            ms8, ms4 = in_turns(runs, budget_s=1.0)
            print(f"batch 1, {args.seq_len} tokens, in turns: 8-bit {ms8:.2f} ms, 4-bit {ms4:.2f} ms ({ms4 / ms8:.2f}x)")


if __name__ == "__main__":
    main()
