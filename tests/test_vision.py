"""Image classification: loaders (folders, archives, MNIST idx), the vision adapter end to end."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def _image(rgb, rng, size=32):
    from PIL import Image

    a = np.clip(np.array(rgb) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """An image folder: train/ and test/ with three colour classes (a task a CNN learns fast)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 8)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _image(rgb, rng).save(root / split / name / f"{i}.png")
    return root


def fit_colours(net, root: Path, steps: int, lr: float, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """``net`` trained (full batch, Adam) on the colour images of ``root/train``: a real teacher."""
    import torch

    from fscompile.data.images import load_image_splits

    torch.manual_seed(0)
    splits, _ = load_image_splits(str(root / "train"))
    names = sorted(COLOURS)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im, _ in splits["all"]])).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor([names.index(c) for _, c in splits["all"]])
    opt = torch.optim.Adam(net.parameters(), lr)
    net.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def colour_teacher(colours, tmp_path_factory) -> Path:
    """A resnet18 state dict trained here on the colour images (a real, accurate teacher)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = fit_colours(torchvision.models.get_model("resnet18", weights=None, num_classes=3), colours, 15, 1e-3)
    path = tmp_path_factory.mktemp("teacher") / "resnet18-colours.pt"
    torch.save(net.state_dict(), path)
    return path


def test_folder_archive_and_idx_loaders(colours, tmp_path):
    from fscompile.data.images import load_image_splits, load_image_task

    task = load_image_task(str(colours), shots=2, seed=0)
    assert task.label_names == ["blue", "green", "red"] and task.shot_split == "train" and task.eval_split == "test"
    assert len(task.shots) == 6 and len(task.eval) == 24
    assert load_image_task(str(colours), shots=2, seed=0).shot_indices == task.shot_indices  # seeded

    # the same folder as a .tar.gz, plus members that must not escape or be followed
    arc = tmp_path / "colours.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(colours, arcname="wrapped")
        evil = tarfile.TarInfo("../../escape/red/x.png")
        data = (colours / "train/red/0.png").read_bytes()
        evil.size = len(data)
        tf.addfile(evil, io.BytesIO(data))
        link = tarfile.TarInfo("wrapped/train/red/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    splits, _ = load_image_splits(str(arc))
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "test": 24}  # ".." and links skipped
    assert not (tmp_path.parent / "escape").exists()  # read in memory, never extracted

    # MNIST idx files: a single split, evaluation on a held-out part, numeric class order
    d = tmp_path / "mnist"
    d.mkdir()
    imgs = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    labels = np.array([i % 10 for i in range(40)], dtype=np.uint8)
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + b"".join(
        int(n).to_bytes(4, "big") for n in imgs.shape) + imgs.tobytes()))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (40).to_bytes(4, "big")
                                                                + labels.tobytes()))
    task = load_image_task(str(d), shots=1, seed=0)
    assert task.label_names == [str(i) for i in range(10)] and len(task.shots) == 10
    assert len(task.eval) == 20 and "held-out" in task.eval_split
    assert task.shots[0].image.size == (8, 8) and task.shots[0].image.mode == "RGB"


def test_image_compile_end_to_end(colours, colour_teacher, tmp_path):
    import onnxruntime as ort

    import fscompile

    out = tmp_path / "out"
    m = fscompile.compile("resnet18", weights=str(colour_teacher), data=str(colours), shots=5, steps=60,
                          student="mobilenet_v3_small", profile_seconds=0.05, out=out)
    assert m["task"] == "image-classification" and m["student"]["architecture"] == "mobilenet_v3_small"
    assert m["metrics"]["teacher"]["accuracy"] >= 0.9
    # distillation taught the student the teacher's function, far above chance (1/3)
    assert m["metrics"]["student"]["agreement"] >= 0.7
    assert abs(m["metrics"]["artifact"]["accuracy"] - m["metrics"]["student"]["accuracy"]) <= 0.15
    assert m["artifact"]["calibration_samples"] > 0 and m["profile"]["artifact"]["batch1"]["p50_ms"] > 0
    model = out / "model"
    assert {"model.onnx", "config.json", "preprocessor_config.json"} <= {p.name for p in model.iterdir()}
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    sess = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    assert sess.run(["logits"], {"pixel_values": x})[0].shape == (3, 3)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_channel_pruned_student_shrinks_reloads_and_exports(arch, tmp_path):
    """A student derived by channel pruning (the teacher's own architecture, its weights, half
    the channels): convolutions really shrink, the pruned model reloads from its safetensors
    and its ONNX export computes the same logits."""
    import onnxruntime as ort
    import torch

    from fscompile.models import load_any
    from fscompile.models.vision import (
        ImageClassifier,
        ImageModel,
        build_arch,
        derive_image_student,
    )

    torch.manual_seed(0)
    teacher = ImageModel(ImageClassifier(build_arch(arch, 3)).eval(), arch, ["blue", "green", "red"], "test", 32)
    student = derive_image_student(teacher, arch)
    before = student.num_parameters()
    info = student.prune(0.5)
    assert info["pattern"] == "structured-channels" and student.num_parameters() < 0.45 * before
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = student.module(x).logits
    student.save_torch(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(load_any(tmp_path / "s").module(x).logits, ref)
    student.export_onnx(tmp_path / "s.onnx")
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], {"pixel_values": x.numpy()})[0], ref.numpy(), atol=1e-4)


@pytest.mark.parametrize("classes", [3, 2])  # two: sklearn's one-row binary head becomes two logits
def test_teacher_with_other_classes_gets_a_refitted_head(colours, tmp_path, classes):
    import shutil

    import torch
    import torchvision

    from fscompile.data.images import load_image_task
    from fscompile.models.vision import load_image_teacher
    from fscompile.tasks.vision import fit_image_head, predict_images, torch_image_runner

    torch.manual_seed(0)
    w = tmp_path / "five.pt"
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=5).state_dict(), w)
    dropped = sorted(COLOURS)[classes:]
    root = shutil.copytree(colours, tmp_path / "data", ignore=lambda d, names: [n for n in names if n in dropped])
    task = load_image_task(str(root), shots=4, seed=0)
    teacher = load_image_teacher("resnet18", task.label_names, 32, str(w))
    assert not teacher.has_head
    info = fit_image_head(teacher, task, seed=0)
    assert teacher.has_head and teacher.label_names == task.label_names
    assert info["train_accuracy"] > 0.9  # colour is linearly separable even in random features
    assert 0.05 <= info["temperature"] <= 20  # fitted on held-out shots, for the label-free estimate
    logits = predict_images(torch_image_runner(teacher), teacher, task.shots)
    assert logits.shape == (len(task.shots), classes)
    assert (logits.argmax(-1) == [e.label for e in task.shots]).mean() > 0.9  # the installed head is the fitted one


@pytest.mark.parametrize("args,message", [
    (["resnet18", "--weights", "{tmp}/garbage.pt"], "cannot load --weights"),
    # a pickle that runs code on load: weights_only refuses it, and nothing runs
    (["resnet18", "--weights", "{tmp}/evil.pt"], "cannot load --weights"),
    (["resnet18", "--weights", "{tmp}/state.pt", "--student", "not_a_net"], "unknown image architecture"),
    (["resnet18", "--weights", "{tmp}/state.pt", "--embedding-bits", "4"], "apply to text models only"),
    (["resnet18", "--weights", "{tmp}/state.pt", "--data", "{tmp}/missing-dir/"], "does not exist"),
])
def test_image_input_errors_are_one_line(colours, tmp_path, args, message):
    import torch
    import torchvision

    from fscompile.cli import main

    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Payload(str(tmp_path / "PWNED"))))
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=3).state_dict(), tmp_path / "state.pt")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data" not in args:
        args += ["--data", str(colours)]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o"), "--steps", "2", "--quiet"])
    assert r.exit_code == 3, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "PWNED").exists()


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_image_bench_runs_through_the_same_tables(colours, colour_teacher, tmp_path):
    from fscompile.cli import main

    out = tmp_path / "bench"
    r = CliRunner().invoke(main, ["bench", "--teacher", "resnet18", "--weights", str(colour_teacher), "--data",
                                  str(colours), "--student", "mobilenet_v3_small", "--targets", "ort-fp32,ort-int8",
                                  "--shots", "2", "--seeds", "1", "--steps", "10", "--profile-seconds", "0.05",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    systems = {row.get("system") for row in rows}
    assert {"fscompile ort-fp32", "fscompile ort-int8", "teacher PyTorch fp32", "teacher ORT fp32",
            "teacher ORT dynamic INT8", "teacher ORT static INT8"} <= systems
    assert "teacher fused + ORT dynamic INT8" not in systems  # no transformer to fuse in a CNN
    assert all(0 <= row["accuracy"] <= 1 for row in rows if row.get("kind") == "fscompile")
    assert "fscompile ort-int8" in (out / "table.md").read_text()


@pytest.mark.parametrize("bomb", ["members", "expansion", "tar-size"])
def test_archive_bombs_are_refused_from_their_headers(colour_teacher, tmp_path, monkeypatch, bomb):
    """Limits lowered so the bombs stay small here; the checks read headers, nothing is decoded."""
    import zipfile

    from fscompile.cli import main

    monkeypatch.setattr("fscompile.data.images.MAX_ARCHIVE_MEMBERS", 50)
    monkeypatch.setattr("fscompile.data.images.MAX_ARCHIVE_BYTES", 4 * 2**20)
    arc = tmp_path / ("bomb.tar" if bomb == "tar-size" else "bomb.zip")
    if bomb == "members":  # many tiny members
        with zipfile.ZipFile(arc, "w") as zf:
            for i in range(60):
                zf.writestr(f"train/red/{i}.png", b"x")
        message = "60 members, more than the 50"
    elif bomb == "expansion":  # one member that inflates ~1000x
        with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            zf.writestr("train/red/0.png", bytes(3 * 2**20))
        message = "refused as a decompression bomb"
    else:  # a tar whose headers promise more than the byte limit
        with tarfile.open(arc, "w") as tf:
            for i in range(3):
                info = tarfile.TarInfo(f"train/red/{i}.png")
                info.size = 2 * 2**20
                tf.addfile(info, io.BytesIO(bytes(info.size)))
        message = "6 MiB uncompressed, more than the 4 MiB"
    r = CliRunner().invoke(main, ["resnet18", "--weights", str(colour_teacher), "--data", str(arc),
                                  "--out", str(tmp_path / "o"), "--steps", "2", "--quiet"])
    assert r.exit_code == 3, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
