"""What a 4-bit word table costs in latency and saves in size: one untrained student shape (no
distillation: weights change neither) at 8- and 4-bit tables, built as the budget search probes shapes
(``tasks.text.probe_shapes``: evenly spaced layers, dynamic INT8), then timed in turns ``--times`` times,
with the embedding ops each build holds.

    python benchmarks/embedding_bits.py --layers 2 --prune 0.2
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

from common import REPO, SHARED


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(SHARED / "teachers/minilm-sst2"))
    p.add_argument("--data", default=str(SHARED / "data/glue_sst2"))
    p.add_argument("--layers", type=int, default=2, help="how many teacher layers the student keeps, evenly spaced")
    p.add_argument("--prune", type=float, default=0.2)
    p.add_argument("--times", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import onnx

    from fscompile.config import CompileConfig
    from fscompile.pipeline import resolve_backend
    from fscompile.profile import in_turns
    from fscompile.tasks.text import probe_shapes

    cfg = CompileConfig(teacher=args.teacher, data=args.data, target="ort-int8", shots=10, seq_len=args.seq_len)
    backend = resolve_backend(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the search's own shape probes: the same build, the same timing
        _, shapes, _ = probe_shapes(cfg, backend, lambda n: [(args.layers, args.prune, b) for b in (8, 4)], Path(tmp),
                                    lambda *a: None)
        runs = []
        for bits, shape in zip((8, 4), shapes):
            art, feed = shape["probe"]
            graph = onnx.load(str(art.path / art.model_file), load_external_data=False).graph
            ops = collections.Counter(n.op_type for n in graph.node if "Gather" in n.op_type or "Embed" in n.op_type)
            print(f"{bits}-bit table: {shape['size_mb']:.2f} MB, embedding ops {dict(ops)}")
            runs.append(lambda run=backend.load(art), feed=feed: run(feed))
        for _ in range(args.times):
            ms8, ms4 = in_turns(runs, budget_s=1.0)
            print(f"batch 1, {args.seq_len} tokens, in turns: 8-bit {ms8:.2f} ms, 4-bit {ms4:.2f} ms ({ms4 / ms8:.2f}x)")


if __name__ == "__main__":
    main()
