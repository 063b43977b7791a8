import numpy as np
import onnx
import pytest
import torch
from fscompile.backends import Recipe, get_backend, registered
from fscompile.backends.onnxruntime import vnni_flags
from fscompile.calibration import choose

from fscompile.augment import build_transfer_set
from fscompile.config import CompileConfig
from fscompile.errors import InputError
from fscompile.models.text import derive_student, load_teacher
from fscompile.tasks.text import calibration_set
from tests.test_distill import SHOTS


def test_choice_prefers_the_smallest_as_accurate_variant():
    table = {"static": {"agreement": 0.992, "b1_p50_ms": 10.8, "size_mb": 54.7},
             "dynamic": {"agreement": 0.984, "b1_p50_ms": 6.2, "size_mb": 16.0},
             "int4": {"agreement": 0.90, "b1_p50_ms": 5.0, "size_mb": 9.0}}
    assert choose(table, 256) == "dynamic"  # within two standard errors of the best, 3.4x smaller
    assert choose(table, 100000) == "static"  # enough validation inputs to tell them apart
    table["near"] = {"agreement": 0.99, "b1_p50_ms": 5.5, "size_mb": 16.5}
    assert choose(table, 256) == "near"  # sizes within 10% of the smallest: the faster one
    # a budget search's limits: only the variants within them compete (the static one agreed better,
    # but a 20 MB budget rules it out), unless none is within
    del table["near"]
    assert choose(table, 100000, (20.0, None)) == "dynamic" and choose(table, 100000, (None, 8.0)) == "dynamic"
    assert choose(table, 256, (None, 5.5)) == "int4"
    # none within: the nearest (a trial over budget misses anyway; the nearer variant may not)
    assert choose(table, 100000, (None, 4.0)) == "int4" and choose(table, 100000, (1.0, None)) == "int4"


def test_choice_judges_variants_by_the_retention_the_teacher_says_they_lose():
    """Where the teacher's probabilities are known, a variant that flips only rows the teacher hesitated on
    is as accurate as the fp32 student, whatever its bare agreement; one that flips rows it was sure of is not."""
    from fscompile.calibration import retention_change

    probs = np.full((256, 2), 0.5)
    probs[:, 0] = np.linspace(0.98, 0.52, 256)  # the teacher favours class 0 everywhere, the last rows barely
    probs[:, 1] = 1 - probs[:, 0]
    ref = np.zeros(256, dtype=int)  # the fp32 student answers as the teacher does
    hesitant, sure = ref.copy(), ref.copy()
    hesitant[-5:] = 1  # 5 flips (agreement 0.980) where the teacher said 0.52-0.53
    sure[:2] = 1  # 2 flips (agreement 0.992) where it said 0.98
    change_h, se_h = retention_change(probs, hesitant, ref)
    change_s, se_s = retention_change(probs, sure, ref)
    assert -0.005 < change_h < 0 and change_s < -0.005 and se_h < se_s
    table = {"static": {"agreement": 0.996, "retention_change": 0.0005, "retention_change_se": 0.0005,
                        "b1_p50_ms": 6.9, "size_mb": 54.7},
             "dynamic": {"agreement": 0.980, "retention_change": change_h, "retention_change_se": se_h,
                         "b1_p50_ms": 4.7, "size_mb": 16.0}}
    assert choose(table, 256) == "dynamic"  # the agreement rule would keep static: 0.980 < 0.996 - 2 SE
    assert choose({k: {kk: vv for kk, vv in v.items() if not kk.startswith("retention")}
                   for k, v in table.items()}, 256) == "static"
    table["dynamic"].update(retention_change=-0.035, retention_change_se=0.005)
    assert choose(table, 256) == "static"  # 3.5 points lost, beyond two standard errors
    table["static"].update(retention_change=-0.02, retention_change_se=0.004)
    assert choose(table, 256) == "static"  # none within: the nearest to the fp32 student
    table["static"]["retention_change"] = -0.027
    assert choose(table, 256) == "dynamic"  # ... within the margin of the best, the smaller one


def test_builtin_targets_are_entry_points():
    assert {"ort-fp32", "ort-int8"} <= set(registered())
    ok, why = get_backend("ort-int8").available()
    assert ok, why


def test_unknown_target_suggests_close_match():
    with pytest.raises(InputError, match="Did you mean ort-int8"):
        get_backend("ort-int9")


@pytest.fixture(scope="module")
def student(tiny_teacher):
    s, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    return s


def _calib(student):
    ts = build_transfer_set(SHOTS, per_shot=10, seed=0, mask_token="[MASK]")
    return calibration_set(student, ts, CompileConfig(), n_calibrate=16, n_validate=16)


def test_ort_fp32_matches_torch_with_dynamic_axes(student, tmp_path):
    backend = get_backend("ort-fp32")
    art = backend.compile(student, _calib(student), tmp_path / "fp32", Recipe())
    model = onnx.load(str(art.path / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits"]
    run = backend.load(art)
    for texts in (["great film"], ["a dull film", "the parcel arrived late and crushed today"]):
        x = student.encode(texts)
        with torch.no_grad():
            ref = student.module(**x).logits.numpy()
        got = run({k: v.numpy() for k, v in x.items()})
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_ort_int8_artifact_loads_with_plain_onnxruntime(student, tmp_path):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    cal = _calib(student)
    art = get_backend("ort-int8").compile(student, cal, tmp_path / "int8", Recipe())
    assert art.info["variant"] in art.info["candidates"]
    assert {"dynamic-per-channel", "static-qdq-minmax", "static-qdq-entropy", "static-qdq-percentile"} \
        == set(art.info["candidates"]), art.info["errors"]
    assert art.info["calibration_samples"] == cal.num_calibration_samples > 0
    # hardware-aware as cpu-vnni: 7-bit weights where the CPU has no VNNI (u8 x s8 would saturate)
    assert art.info["reduce_range"] == (not any(vnni_flags().values()))
    assert {"config.json", "model.onnx", "tokenizer.json"} <= {p.name for p in art.path.iterdir()}
    tok = AutoTokenizer.from_pretrained(art.path)
    sess = ort.InferenceSession(str(art.path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    enc = tok(["great value", "a dull and tedious film"], padding=True, return_tensors="np")
    logits = sess.run(["logits"], {k: enc[k].astype(np.int64) for k in names})[0]
    with torch.no_grad():
        ref = student.module(**student.encode(["great value", "a dull and tedious film"])).logits.numpy()
    assert logits.shape == (2, 2)
    assert np.abs(logits - ref).max() < 0.5  # INT8 error on a random tiny model stays small


@pytest.mark.parametrize("variant", ["dynamic-per-channel", "static-qdq-entropy"])
def test_ort_int8_builds_only_a_requested_variant(student, tmp_path, variant):
    """Verification's unpruned twin asks for the variant the artifact kept, and gets only that one."""
    art = get_backend("ort-int8").compile(student, _calib(student), tmp_path / "one", Recipe(variant=variant))
    assert set(art.info["candidates"]) == {variant} and art.info["variant"] == variant, art.info["errors"]


def test_prepare_prunes_ffn(tiny_teacher):
    s, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    get_backend("ort-int8").prepare(s, Recipe(prune=0.5))
    assert s.info["prepare"]["ffn_channels_after"] == 2 * 32


@pytest.mark.parametrize("target", ["ort-int8", "cpu-vnni"])
def test_four_bit_embeddings_shrink_the_table_and_keep_outputs(student, tmp_path, target):
    import onnx
    from fscompile.backends.onnxruntime import OrtRunner

    cal = _calib(student)
    backend = get_backend(target)
    a8 = backend.compile(student, cal, tmp_path / "e8", Recipe(calibration="minmax"))
    a4 = backend.compile(student, cal, tmp_path / "e4", Recipe(calibration="minmax", embedding_bits=4))
    graph = onnx.load(str(a4.path / "model.onnx")).graph
    # the word table only, the one prepare rounds for training: positions and token types stay as in 8-bit builds
    quantized = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(quantized) == 1 and "word_embeddings" in quantized[0].input[0], [n.input[0] for n in quantized]
    assert a4.info["embedding_bits"] == 4
    # the table's bytes roughly halve (4 vs 8 bits, plus block scales and zero points: 0.64x at this tiny width)
    def table_bytes(artifact) -> int:
        inits = onnx.load(str(artifact.path / "model.onnx")).graph.initializer
        return sum(len(i.raw_data) for i in inits if "word_embeddings.weight" in i.name)

    assert table_bytes(a4) < 0.7 * table_bytes(a8) and a4.info["size_mb"] < a8.info["size_mb"]
    r8, r4 = OrtRunner(a8.path / "model.onnx"), OrtRunner(a4.path / "model.onnx")
    for batch in cal.validate:
        assert np.abs(r8(batch) - r4(batch)).max() < 0.5


def test_prepare_rounds_the_embedding_table_to_what_four_bit_artifacts_ship(tiny_teacher):
    """After prepare, the fp32 student's table is one that ORT's 4-bit block quantizer (the
    function its Gather quantization calls) stores exactly; the original table is not."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    def stored(table: np.ndarray, block: int) -> np.ndarray:
        """What ORT's quantizer keeps of ``table``, dequantized."""
        packed, scales, zeros = DefaultWeightOnlyQuantizer.quantize_ndarray(table, 1, block, False)
        def unpack(a, n):
            return np.stack([a & 0xF, a >> 4], -1).reshape(-1)[:n].astype(np.float32)
        rows, width = table.shape
        q = unpack(packed, table.size).reshape(rows, width)
        z = unpack(zeros, scales.size).reshape(scales.shape)
        return (q - np.repeat(z, block, 1)[:, :width]) * np.repeat(scales, block, 1)[:, :width]

    student, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    before = student.module.base.get_input_embeddings().weight.detach().numpy().copy()
    get_backend("ort-int8").prepare(student, Recipe(prune=0.0, embedding_bits=4))
    after = student.module.base.get_input_embeddings().weight.detach().numpy()
    assert student.info["prepare"]["embedding_table"] == {"bits": 4, "block_size": 32, "rows": after.shape[0]}
    assert np.abs(stored(before, 32) - before).max() > 1e-3  # ORT would round the original table
    assert np.abs(stored(after, 32) - after).max() < 1e-6  # and keeps the prepared one as it is
    assert np.abs(after - before).max() <= np.abs(stored(before, 32) - before).max() + 1e-6
    fp32, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    get_backend("ort-fp32").prepare(fp32, Recipe(prune=0.0, embedding_bits=4))  # fp32 ships the table as is
    assert "embedding_table" not in fp32.info["prepare"]


def test_variants_are_compared_on_generated_text_where_there_is_some(student):
    """Augmented shots agree near 99% under any variant; generated or unlabelled text is the real-like check."""
    from fscompile.augment import TransferSet

    ts = build_transfer_set(SHOTS, per_shot=10, seed=0, mask_token="[MASK]")
    n_aug = len(ts)
    gen = [f"generated review number {i} about a film" for i in range(80)]
    with_gen = TransferSet(ts.texts + gen, None, ts.origin + ["generated"] * 80)
    cal = calibration_set(student, with_gen, CompileConfig(), n_calibrate=16, n_validate=256)
    assert cal.num_validation_samples == 40  # half the generated texts, none of the augmented shots
    validated = {tuple(r[r > 0]) for b in cal.validate for r in b["input_ids"]}
    assert validated <= {tuple(student.tokenizer(t)["input_ids"]) for t in gen}
    assert cal.num_calibration_samples == 16
    assert n_aug < 80 + n_aug == len(with_gen)


def test_validation_rows_carry_the_teachers_probabilities_row_for_row(tiny_opinionated, student):
    """The variants are judged on the teacher's probabilities of the very rows each validation batch holds
    (the batches are sorted by length, so an order slip would pair a row with another row's reading)."""
    from fscompile.augment import TransferSet
    from fscompile.evaluate import softened, torch_runner

    teacher = load_teacher(str(tiny_opinionated))  # wide weights: its readings differ from row to row
    for m in teacher.module.modules():  # without dropout its reading is its softmax: comparable per batch
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ts = build_transfer_set(SHOTS, per_shot=10, seed=0, mask_token="[MASK]")
    gen = [" ".join(["word"] * (1 + i % 9)) + f" film {i}" for i in range(80)]  # lengths that reorder
    with_gen = TransferSet(ts.texts + gen, None, ts.origin + ["generated"] * 80)
    for data in (ts, with_gen):
        cal = calibration_set(student, data, CompileConfig(), n_calibrate=16, n_validate=64, teacher=teacher,
                              temperature=1.0)
        assert [len(p) for p in cal.validate_probabilities] == [len(b["input_ids"]) for b in cal.validate]
        run = torch_runner(teacher)
        assert np.ptp(np.concatenate(cal.validate_probabilities)[:, 0]) > 0.05  # a slip would show
        for batch, probs in zip(cal.validate, cal.validate_probabilities):
            np.testing.assert_allclose(probs, softened(np.asarray(run(batch)), 1.0), atol=1e-4)


def test_four_bit_table_keeps_a_graph_with_opset_17_reductions_valid(tmp_path):
    """The embedding quantizer lifts the opset to 21; a sentence-transformers body normalises with a
    ReduceL2 whose axes are an attribute before opset 18 (AG News with minilm failed on this)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fscompile.backends.onnxruntime import quantize_embeddings

    table = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("ReduceL2", ["emb"], ["norm"], name="l2", axes=[-1], keepdims=1),
         helper.make_node("Div", ["emb", "norm"], ["out"], name="div")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 64])], [numpy_helper.from_array(table, "table")])
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    quantize_embeddings(src, dst, bits=4)
    ids = np.array([1, 5, 299])
    out = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    ref = table[ids] / np.linalg.norm(table[ids], axis=-1, keepdims=True)
    assert np.abs(out - ref).max() < 0.1  # 4-bit rows, normalised as before
