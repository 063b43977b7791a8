"""Extractive question-answering models: a BERT-family encoder with a span head."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, StageError
from .base import HFQuestionAnswering, encoder_layers, resolve_source, short_error
from .text import TextModel


class QAModel(TextModel):
    """A span-prediction model: exports ``start_logits`` and ``end_logits`` (Optimum's names)."""

    def export_onnx(self, path: Path, opset: int = 17) -> None:
        names = self.input_names

        class _Spans(nn.Module):
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *args):
                logits = self.inner(*args).logits
                return logits[..., 0], logits[..., 1]

        dummy = self.encode(["what is probed?"], ["the export probe is probed here, with a longer context."])
        axes = {k: {0: "batch_size", 1: "sequence_length"} for k in [*names, "start_logits", "end_logits"]}
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_Spans(self.module).eval(), tuple(dummy[k] for k in names), str(path),
                                  input_names=names, output_names=["start_logits", "end_logits"], dynamic_axes=axes,
                                  opset_version=opset, dynamo=False)
        except Exception as e:  # exporter failures are many types; surface one line
            raise StageError(f"ONNX export failed: {short_error(e)}") from e

    def save_pretrained(self, out: Path) -> None:
        cfg = copy.deepcopy(self.config)
        cfg.architectures = [type(self.module.hf).__name__]
        cfg.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


def load_qa_teacher(spec: str, *, trust_remote_code: bool = False) -> QAModel:
    """A teacher with a question-answering head, from a Hub id or a local directory."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer

    source = resolve_source(spec)
    kw = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **kw)
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model {spec!r}: {short_error(e)}") from None
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForQuestionAnswering") for a in archs):
        raise InputError(f"{spec!r} has no question-answering head (architectures: {archs}); "
                         "extractive QA needs a teacher fine-tuned for it")
    try:
        hf = AutoModelForQuestionAnswering.from_pretrained(source, attn_implementation="eager", **kw)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the weights of {spec!r}: {short_error(e)}") from None
    module = HFQuestionAnswering(hf).eval()
    n = len(encoder_layers(module.base))
    return QAModel(module, tokenizer, ["start", "end"], source=source,
                   info={"spec": spec, "model_type": config.model_type, "architectures": archs, "num_layers": n})
