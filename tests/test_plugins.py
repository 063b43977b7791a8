"""Targets as plugins: a third-party backend installed from a temporary package."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from fscompile.backends import Recipe, get_backend
from fscompile.backends.cpu_vnni import vnni_flags
from fscompile.backends.tensorrt import is_2to4, mask_2to4, tensorrt_status

from fscompile.models.text import derive_student, load_teacher
from tests.test_backends import _calib

PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "fscompile-echo"
        version = "0.0.1"
        [project.entry-points."fscompile.backends"]
        echo-fp32 = "fscompile_echo:EchoBackend"
        broken-target = "fscompile_echo:DoesNotExist"
    """,
    "fscompile_echo.py": """
        from fscompile.backends.onnxruntime import OrtFp32Backend

        class EchoBackend(OrtFp32Backend):
            '''A third-party target: ORT fp32 under another name.'''
            name = "echo-fp32"
            description = "third-party test target"
    """,
}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    src = tmp_path_factory.mktemp("echo-src")
    for name, text in PLUGIN.items():
        (src / name).write_text(textwrap.dedent(text))
    target = tmp_path_factory.mktemp("echo-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True)
    return target


def _cli(args, plugin_path):
    env = dict(os.environ, PYTHONPATH=f"{plugin_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "fscompile.cli", *args], capture_output=True, text=True, env=env)


def test_third_party_backend_is_listed_and_usable(plugin_path, tiny_teacher, tmp_path):
    r = _cli(["targets", "--json"], plugin_path)
    listing = json.loads(r.stdout)
    names = {t["name"] for t in listing["targets"]}
    assert {"echo-fp32", "ort-int8", "cpu-vnni", "trt-int8"} <= names
    assert "broken-target" in listing["failed_to_load"]  # a broken plugin is reported, not fatal
    r = _cli([str(tiny_teacher), "--target", "echo-fp32", "--shots", "3", "--steps", "3", "--augment", "1",
              "--profile-seconds", "0.05", "--seq-len", "16", "--out", str(tmp_path / "o"), "--json"], plugin_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["target"]["name"] == "echo-fp32"


def test_cpu_vnni_builds_and_reports_isa(tiny_teacher, tmp_path):
    student, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    art = get_backend("cpu-vnni").compile(student, _calib(student), tmp_path / "vnni", Recipe())
    assert art.info["isa"] == vnni_flags() and art.info["reduce_range"] == (not any(vnni_flags().values()))
    x = student.encode(["great film", "a dull film"])
    logits = get_backend("cpu-vnni").load(art)({k: v.numpy() for k, v in x.items()})
    assert logits.shape == (2, 2) and np.isfinite(logits).all()


def test_mask_2to4():
    import torch

    w = torch.randn(8, 16)
    m = mask_2to4(w)
    assert m.sum() == 8 * 16 // 2 and is_2to4((w * m).numpy())
    assert not is_2to4(w.numpy())


def test_trt_int8_export_only_qdq_is_sparse_and_runs_on_cpu(tiny_teacher, tmp_path):
    import torch

    backend = get_backend("trt-int8")
    ok, why = backend.available()
    assert ok == tensorrt_status()[0] and (ok or why)
    student, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    reference, _ = derive_student(load_teacher(str(tiny_teacher)), [1, 3])
    backend.prepare(student, Recipe(prune=0.2))
    assert student.info["prepare"]["linear_layers"] == 2 * 6
    art = backend.compile(student, _calib(student), tmp_path / "trt", Recipe())
    model = onnx.load(str(art.path / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    matmul_inputs = {x for n in model.graph.node if n.op_type == "MatMul" for x in n.input}
    weights = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.output[0] in matmul_inputs and n.input[0] in inits and inits[n.input[0]].ndim == 2]
    assert len(weights) == 2 * 6 and all(w.dtype == np.int8 for w in weights)
    assert all(is_2to4(w, axis_in=0) for w in weights)  # encoder MatMul weights are [in, out]
    x = student.encode(["great film", "a dull film"])
    got = backend.load(art)({k: v.numpy() for k, v in x.items()})
    with torch.no_grad():
        want = student.module(**x).logits.numpy()
    assert np.abs(got - want).max() < 0.5 and (got.argmax(-1) == want.argmax(-1)).all()
    assert art.info["engine"] is None or ok


def test_trt_target_refused_without_export_only(tiny_teacher, tmp_path):
    from click.testing import CliRunner

    from fscompile.cli import main

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is available here")
    args = [str(tiny_teacher), "--target", "trt-int8", "--shots", "3", "--steps", "3", "--augment", "2",
            "--profile-seconds", "0.05", "--seq-len", "16", "--generator", "none", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 4 and "--export-only" in r.output and not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, [*args, "--export-only", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["target"]["export_only"] and m["artifact"]["engine"] is None
    assert "not the target" in m["verification"]["checks"]["faster_than_student"]["measured_on"]
