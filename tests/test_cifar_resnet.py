"""CIFAR ResNets: the architecture family, real-world checkpoints, block-dropped students, the CLI."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_vision import colours, fit_colours  # noqa: F401  (the image-folder fixture)


def test_family_has_the_published_sizes():
    """Parameter counts of the published checkpoints (their README), so the rebuilt architecture
    is theirs, not a look-alike."""
    from fscompile.models.vision import build_arch

    sizes = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}
    for depth, n in sizes.items():
        net = build_arch(f"cifar_resnet{depth}", 10)
        assert sum(p.numel() for p in net.parameters()) == n
    net = build_arch("cifar_resnet20", 10).eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _wrapped(net: torch.nn.Module) -> dict:
    """The shape of real training-script checkpoints: DataParallel prefixes inside a dict."""
    return {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "best_prec1": 91.0}


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_real_world_checkpoints_load_and_bad_ones_fail_in_one_line(tmp_path, monkeypatch):
    from fscompile.errors import InputError
    from fscompile.models.vision import build_arch, load_image_teacher

    torch.manual_seed(0)
    net = build_arch("cifar_resnet14", 10)
    shapes = {"wrapped.th": _wrapped(net), "model.pt": {"model": net.state_dict(), "epoch": 3},
              "plain.pt": net.state_dict()}
    names = [str(i) for i in range(10)]
    for name, obj in shapes.items():
        torch.save(obj, tmp_path / name)
        t = load_image_teacher("cifar_resnet14", names, 32, str(tmp_path / name))
        for k, v in net.state_dict().items():
            torch.testing.assert_close(t.module.net.state_dict()[k], v)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(InputError, match="cannot load --weights") as e:
        load_image_teacher("cifar_resnet14", names, 32, str(tmp_path / "evil.pt"))
    assert "\n" not in str(e.value) and not (tmp_path / "PWNED").exists()

    with pytest.raises(InputError, match=r"no 'layer1\.2\.conv1\.weight' in the checkpoint"):
        load_image_teacher("cifar_resnet20", names, 32, str(tmp_path / "plain.pt"))  # fewer blocks
    bad = net.state_dict()
    bad["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"'layer2\.0\.conv1\.weight' is \(32, 8, 3, 3\) in the checkpoint, "
                                         r"\(32, 16, 3, 3\) in the model"):
        load_image_teacher("cifar_resnet14", names, 32, str(tmp_path / "bad.pt"))
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(InputError, match="is not a state dict"):
        load_image_teacher("cifar_resnet14", names, 32, str(tmp_path / "nostate.pt"))
    with pytest.raises(InputError, match="6n\\+2"):
        load_image_teacher("cifar_resnet21", names, 32, str(tmp_path / "plain.pt"))
    with pytest.raises(InputError, match="no built-in weights"):
        load_image_teacher("cifar_resnet56", names, 32)


def test_student_drops_half_the_blocks_keeps_teacher_weights_prunes_and_exports(tmp_path):
    import onnxruntime as ort

    from fscompile.models import load_any
    from fscompile.models.vision import (
        ImageClassifier,
        ImageModel,
        build_arch,
        derive_image_student,
    )

    torch.manual_seed(0)
    teacher = ImageModel(ImageClassifier(build_arch("cifar_resnet32", 10)).eval(), "cifar_resnet32",
                         [str(i) for i in range(10)], "test", 32)
    student = derive_image_student(teacher, None)
    sel = student.info["layer_selection"]
    assert student.arch == "cifar_resnet-2-2-3" and student.info["init"] == "teacher"
    assert sel["blocks_before"] == [5, 5, 5] and sel["blocks_kept"] == [[1, 3], [0, 3], [0, 2, 4]]
    t, s = teacher.module.net, student.module.net
    torch.testing.assert_close(s.layer1[0].conv1.weight, t.layer1[1].conv1.weight)
    torch.testing.assert_close(s.layer3[2].bn2.running_var, t.layer3[4].bn2.running_var)
    torch.testing.assert_close(s.linear.weight, t.linear.weight)
    assert sum(len(k) for k in sel["blocks_kept"]) <= sum(sel["blocks_before"]) / 2

    before = student.num_parameters()
    info = student.prune(0.25)  # inside blocks only: the residual stream's widths stay
    assert info["parameters_after"] < before
    assert [b.conv2.out_channels for st in (s.layer1, s.layer2, s.layer3) for b in st] == [16, 16, 32, 32, 64, 64, 64]
    assert s.layer3[0].conv1.out_channels < 64
    student.module.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = student.module(x).logits
    student.save_torch(tmp_path / "s")
    again = load_any(tmp_path / "s")
    assert again.arch == "cifar_resnet-2-2-3" and again.module.net.blocks == (2, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(again.module(x).logits, ref)
    student.export_onnx(tmp_path / "s.onnx")
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], {"pixel_values": x.numpy()})[0], ref.numpy(), atol=1e-4)

    named = derive_image_student(teacher, "cifar_resnet8")  # a named student starts from scratch
    assert named.info["init"] == "random" and named.module.net.blocks == (1, 1, 1)


def test_cli_compiles_a_cifar_resnet_checkpoint(colours, tmp_path):  # noqa: F811
    """``fscompile cifar_resnetN --weights FILE --data D``: a teacher trained here on the colour
    images, saved the way training scripts save; the default student has half its blocks."""
    from fscompile.cli import main
    from fscompile.models.vision import build_arch

    torch.manual_seed(0)
    net = fit_colours(build_arch("cifar_resnet14", 3), colours, 60, 3e-3)
    torch.save(_wrapped(net), tmp_path / "resnet14-colours.th")

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["cifar_resnet14", "--weights", str(tmp_path / "resnet14-colours.th"), "--data",
                                  str(colours), "--shots", "5", "--steps", "40", "--profile-seconds", "0.05",
                                  "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "image-classification" and m["student"]["architecture"] == "cifar_resnet8"
    assert m["student"]["layer_selection"]["blocks_kept"] == [[1], [0], [0]]
    assert m["metrics"]["teacher"]["accuracy"] >= 0.9
    assert m["metrics"]["student"]["agreement"] >= 0.7  # started from the teacher's blocks
    assert (out / "model" / "model.onnx").is_file()
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "cifar_resnet"
