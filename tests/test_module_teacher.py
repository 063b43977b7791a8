"""Teachers handed over as Python objects: a user's own torch module, a transformers model."""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_vision import colours, fit_colours  # noqa: F401  (the image-folder fixture)
from torch import nn

import fscompile


class ColourNet(nn.Module):
    """A user's own architecture, defined only here: no library can rebuild it by name."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # not ImageNet's: the run must use these


@pytest.fixture(scope="module")
def colour_net(colours) -> ColourNet:  # noqa: F811
    torch.manual_seed(0)
    return fit_colours(ColourNet(), colours, 30, 1e-2, MEAN, STD)


def test_a_users_module_compiles_and_is_left_as_it_was(colours, colour_net, tmp_path):  # noqa: F811
    from fscompile.models.base import module_sha256

    before = module_sha256(colour_net)
    m = fscompile.compile(colour_net, data=str(colours), shots=5, steps=40, image_size=32, mean=MEAN, std=STD,
                          student="mobilenet_v3_small", profile_seconds=0.05, out=tmp_path / "a")
    assert m["task"] == "image-classification" and m["config"]["teacher"].startswith("module:ColourNet-")
    assert m["metrics"]["teacher"]["accuracy"] >= 0.9  # only with the normalisation it was trained with
    assert m["metrics"]["student"]["agreement"] >= 0.6
    assert m["profile"]["teacher"]["batch1"]["p50_ms"] > 0  # profiled in a fresh process, without its code
    pre = json.loads((tmp_path / "a" / "model" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == list(MEAN) and pre["image_std"] == list(STD)
    assert module_sha256(colour_net) == before and not colour_net.training

    # the teacher's own architecture as student: its weights, channel-pruned, saved via torch.export
    m = fscompile.compile(colour_net, data=str(colours), shots=5, steps=20, image_size=32, mean=MEAN, std=STD,
                          student="ColourNet", prune=0.25, profile_seconds=0.05, out=tmp_path / "b")
    assert m["student"]["architecture"] == "ColourNet"
    assert m["student"]["parameters"] < sum(p.numel() for p in colour_net.parameters())
    assert m["metrics"]["artifact"]["agreement"] >= 0.6 and m["profile"]["student"]["batch1"]["p50_ms"] > 0


def test_a_transformers_model_with_its_tokenizer(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tiny_teacher)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    m = fscompile.compile(model, tokenizer=tok, out=tmp_path / "o", shots=3, steps=3, augment=2, seq_len=16,
                          max_eval=10, profile_seconds=0.02, generator="none")
    assert m["task"] == "text-classification" and m["student"]["layers_kept"]
    saved = m["config"]["teacher"]
    assert saved.startswith(os.environ["FSCOMPILE_CACHE"]) and os.path.isfile(os.path.join(saved, "config.json"))


def test_objects_that_are_not_teachers_fail_in_one_line(tiny_teacher):
    from transformers import BertForSequenceClassification

    from fscompile.errors import InputError

    with pytest.raises(InputError, match="must be a name, a path or a torch.nn.Module"):
        fscompile.compile(42)
    with pytest.raises(InputError, match="needs its tokenizer"):
        fscompile.compile(BertForSequenceClassification.from_pretrained(tiny_teacher))
    with pytest.raises(ValueError, match="std must be three numbers"):
        fscompile.compile(ColourNet(), std=(0.2, 0.0, 0.2))


def test_a_transformers_image_model_with_its_processor(colours, tmp_path):  # noqa: F811
    """The processor gives the input side and normalisation; the model's output object its logits."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, num_labels=3))
    proc = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD))
    m = fscompile.compile(vit, processor=proc, data=str(colours), shots=3, steps=10, student="mobilenet_v3_small",
                          profile_seconds=0.05, out=tmp_path / "o")
    assert m["task"] == "image-classification" and m["config"]["image_size"] == 32
    assert tuple(m["config"]["mean"]) == MEAN and tuple(m["config"]["std"]) == STD
    assert m["profile"]["teacher"]["batch1"]["p50_ms"] > 0 and (tmp_path / "o" / "model" / "model.onnx").is_file()
