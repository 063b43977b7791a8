"""Text-classification models: teacher resolution, head adaptation, student derivation, export."""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError, StageError
from .base import (
    HEAD_FILE,
    HFClassifier,
    HFQuestionAnswering,
    Output,
    encoder_layers,
    replace_module,
    resolve_source,
    short_error,
)

class MeanPoolClassifier(nn.Module):
    """A headless encoder (e.g. a sentence-transformers body) + mean pooling + a linear head."""

    def __init__(self, body: nn.Module, num_labels: int, normalize: bool) -> None:
        super().__init__()
        self.body = body
        self.normalize = normalize
        self.head = nn.Linear(body.config.hidden_size, num_labels)

    @property
    def base(self) -> nn.Module:
        return self.body

    def pool(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
        pooled = (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *, inputs_embeds=None,
                output_hidden_states=False, output_attentions=False) -> Output:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.body(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions, **kw)
        logits = self.head(self.pool(out.last_hidden_state, attention_mask))
        return Output(logits, out.hidden_states, out.attentions)


@dataclass
class TextModel:
    """A classifier module with its tokenizer, label names and provenance."""

    module: nn.Module
    tokenizer: Any
    label_names: list[str]
    source: str
    has_head: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self):
        return self.module.base.config

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        if "token_type_ids" in getattr(self.tokenizer, "model_input_names", []):
            names.append("token_type_ids")
        return names

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def layers(self) -> nn.ModuleList:
        return encoder_layers(self.module.base)

    def encode(self, texts: list[str], pairs: list[str] | None = None, max_length: int = 128,
               padding: bool | str = True) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=padding,
                             return_tensors="pt")
        return {k: enc[k] for k in self.input_names}

    # What backends ask of any task's model (cf. ImageModel): ORT fusion, ops worth quantizing,
    # export, the files beside the ONNX model, a torch copy for profiling, structured pruning.
    fusion: ClassVar[str | None] = "bert"
    quant_ops: ClassVar[tuple[str, ...]] = ("MatMul",)
    weight_only_int4: ClassVar[bool] = False  # ort-int8 also tries 4-bit weight-only MatMulNBits (LMs)
    static_qdq: ClassVar[bool] = True  # ort-int8 also tries static QDQ calibrated on the shots

    def export_onnx(self, path: Path) -> None:
        export_onnx(self, path)

    def save_pretrained(self, out: Path) -> None:
        save_pretrained(self, out)

    def save_torch(self, out: Path) -> None:
        save_torch(self, out)

    def prune(self, rate: float, heads: bool = False) -> dict[str, Any]:
        """FFN channels (and, with ``heads``, whole attention heads) at ``rate``: the matrices
        really shrink."""
        if not heads:
            return {"pattern": "structured-ffn-channels", "rate": rate, **prune_ffn(self, rate)}
        return {"pattern": "structured-heads+ffn-channels", "rate": rate, **prune_heads(self, rate),
                **prune_ffn(self, rate)}

    def attention_geometry(self) -> tuple[int, int]:
        """(heads, query width) of the first block as it is now (after head pruning)."""
        q, _, _, _, size = attention_parts(self.layers()[0])
        return q.out_features // size, q.out_features


def _set_num_layers(config, n: int) -> None:
    for attr in ("num_hidden_layers", "n_layers"):
        if hasattr(config, attr):
            setattr(config, attr, n)


def load_teacher(spec: str, label_names: list[str] | None = None, *,
                 trust_remote_code: bool = False) -> TextModel:
    """Load a BERT-family teacher from a Hub id, an alias or a local directory."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    source = resolve_source(spec)
    kw = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        where = "local directory" if Path(source).is_dir() else "Hugging Face Hub id"
        raise InputError(f"cannot load model {spec!r} ({where}): {short_error(e)}") from None
    if Path(source).is_dir() and not any(Path(source).glob("*.safetensors")) \
            and not any(Path(source).glob("*.bin")):
        raise InputError(f"{source} has a config.json but no model weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer of {spec!r}: {short_error(e)}") from None

    archs = getattr(config, "architectures", None) or []
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    load_kw = dict(kw, attn_implementation="eager")  # eager: attentions for KD, fusable ONNX
    try:
        if has_head:
            hf = AutoModelForSequenceClassification.from_pretrained(source, **load_kw)
            module: nn.Module = HFClassifier(hf)
            names = [str(config.id2label[i]) for i in range(config.num_labels)]
        else:
            if label_names is None:
                raise InputError(f"{spec!r} has no classification head; give --data with labels")
            body = AutoModel.from_pretrained(source, **load_kw)
            module = MeanPoolClassifier(body, len(label_names), _st_normalizes(source))
            names = list(label_names)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the weights of {spec!r}: {short_error(e)}") from None
    encoder_layers(module.base)  # fail now, not mid-compile, on unsupported architectures
    module.eval()
    return TextModel(module, tokenizer, names, source=source, has_head=has_head,
                     info={"spec": spec, "model_type": config.model_type,
                           "architectures": archs, "num_layers": len(encoder_layers(module.base))})


def _st_normalizes(source: str) -> bool:
    """Whether a sentence-transformers model ends with a Normalize module."""
    modules = Path(source) / "modules.json"
    if not modules.is_file():
        return False
    try:
        return any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    except (ValueError, AttributeError):
        return False


def align_labels(teacher: TextModel, data_labels: list[str]) -> list[int] | None:
    """Map data class index -> teacher class index, or None when the teacher needs a new head.

    Matches by name (case-insensitive), else by index when the data labels are the integers
    0..K-1 and the teacher has K classes. Raises when a teacher's head cannot fit the data.
    """
    if not teacher.has_head:
        return None
    t_names = [n.lower() for n in teacher.label_names]
    d_names = [n.lower() for n in data_labels]
    if set(d_names) <= set(t_names):
        return [t_names.index(n) for n in d_names]
    if all(n.isdecimal() for n in d_names) and all(int(n) < len(t_names) for n in d_names):
        return [int(n) for n in d_names]
    raise InputError(f"the teacher's labels {teacher.label_names} do not match the data's labels "
                     f"{data_labels}; pass a teacher without a head (or one trained on these labels)")


def derive_student(teacher: TextModel, layers: str | list[int] | None) -> tuple[TextModel, list[int]]:
    """A student keeping a subset of the teacher's layers, initialised from the teacher."""
    n = len(teacher.layers())
    keep = list(layers) if isinstance(layers, list) else parse_layers(layers, n)
    if isinstance(keep, int):
        raise ValueError("a layer count needs select_layers() to pick the layers first")
    module = copy.deepcopy(teacher.module)
    stack = encoder_layers(module.base)
    kept = nn.ModuleList([stack[i] for i in keep])
    parent = module.base
    for attr in ("encoder", "transformer"):
        if hasattr(parent, attr) and getattr(getattr(parent, attr), "layer", None) is stack:
            getattr(parent, attr).layer = kept
            break
    else:
        raise StageError("cannot replace the encoder layers of this architecture")
    _set_num_layers(module.base.config, len(keep))
    student = type(teacher)(module, teacher.tokenizer, list(teacher.label_names), source=teacher.source,
                            has_head=True, info={"layers_kept": keep, "teacher_layers": n})
    return student, keep


def select_layers(teacher: TextModel, k: int, probe: dict[str, torch.Tensor]) -> tuple[list[int], list[dict]]:
    """Choose ``k`` teacher layers by their measured effect: starting from all layers, drop
    the one whose removal keeps the truncated model closest to the teacher on ``probe``
    inputs (agreement of predictions first, then KL), until ``k`` remain.

    The probe needs no labels: the teacher's own outputs on augmented shots are the target.
    Returns the kept layers and the elimination trace for the report.
    """
    n = len(teacher.layers())
    with torch.no_grad():
        t_logits = teacher.module(**probe).logits
        t_logp = torch.log_softmax(t_logits, -1)

    def score(keep: list[int]) -> tuple[float, float]:
        student, _ = derive_student(teacher, keep)
        with torch.no_grad():
            s = student.module(**probe).logits
        agree = (s.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), t_logp, log_target=True,
                                        reduction="batchmean").item()
        return agree, -kl

    keep, trace = list(range(n)), []
    while len(keep) > k:
        options = {drop: score([i for i in keep if i != drop]) for drop in keep}
        drop = max(options, key=lambda d: options[d])
        keep.remove(drop)
        trace.append({"dropped": drop, "agreement": options[drop][0], "kl": -options[drop][1]})
    return keep, trace


def parse_layers(spec: str | None, n: int) -> list[int] | int:
    """What ``--student-layers`` asks for: ``"every-other"`` (the default: 1,3,5 of 6), a count
    of layers to choose by measured effect (``"3"``), or explicit indices (``"0,2,4"``).

    Every other layer is the default because on the SST-2 teacher it distilled best: the
    subsets that agree most with the teacher *before* distillation ended lower after it
    (README, few-shot benchmark)."""
    spec = "every-other" if spec is None else spec.strip()
    if spec == "every-other":
        return list(range(1, n, 2)) if n > 1 else [0]
    if spec.isdecimal():
        k = int(spec)
        if not 1 <= k <= n:
            raise InputError(f"--student-layers {k}: must be between 1 and the teacher's {n} layers")
        return k
    try:
        keep = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--student-layers {spec!r}: expected a count, every-other, or indices like 0,2,4") from None
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise InputError(f"--student-layers {spec!r}: indices must be in 0..{n - 1}")
    return keep


def export_onnx(model: TextModel, path: Path, opset: int = 17) -> None:
    """Export to one-file ONNX with dynamic batch/sequence axes and output ``logits``."""
    names = model.input_names

    class _Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args).logits

    dummy = model.encode(["fscompile export probe", "a second, longer probe sentence for shapes"])
    args = tuple(dummy[k] for k in names)
    axes = {k: {0: "batch_size", 1: "sequence_length"} for k in names}
    axes["logits"] = {0: "batch_size"}
    module = _Logits(model.module).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about constant shapes are expected here
            # The legacy exporter (opset 17) yields graphs ORT's transformer optimizer can fuse.
            torch.onnx.export(module, args, str(path), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    except Exception as e:  # exporter failures are many types; surface one line
        raise StageError(f"ONNX export failed: {short_error(e)}") from e


def save_pretrained(model: TextModel, out: Path) -> None:
    """Write config.json (with labels) and tokenizer files: the Optimum layout minus the weights."""
    cfg = copy.deepcopy(model.config)
    cfg.id2label = {i: n for i, n in enumerate(model.label_names)}
    cfg.label2id = {n: i for i, n in enumerate(model.label_names)}
    if not getattr(cfg, "architectures", None) or not cfg.architectures[0].endswith("ForSequenceClassification"):
        cfg.architectures = [type(model.module.base).__name__.replace("Model", "ForSequenceClassification")]
    cfg.save_pretrained(out)
    model.tokenizer.save_pretrained(out)


def save_torch(model: TextModel, out: Path) -> None:
    """Save the torch model (config, one safetensors file, how it was reshaped) so another
    process can rebuild it with :func:`load_torch`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    m = model.module
    m.base.config.save_pretrained(out)
    state = {k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}  # clone: no shared storage
    save_file(state, out / "model.safetensors")
    model.tokenizer.save_pretrained(out)
    kind = "qa" if isinstance(m, HFQuestionAnswering) else "hf" if isinstance(m, HFClassifier) else "mean-pool"
    meta = {"kind": kind, "labels": model.label_names,
            "normalize": getattr(m, "normalize", False), "embedding_rank": embedding_rank(model)}
    (out / HEAD_FILE).write_text(json.dumps(meta))


def load_torch(path: Path, cls: type[TextModel] | None = None) -> TextModel:
    """Load a model written by :func:`save_torch` (safetensors only, no remote code), wrapped
    in ``cls`` (default ``TextModel``; :func:`fscompile.models.load_any` picks ``QAModel`` for span models)."""
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    meta = json.loads((path / HEAD_FILE).read_text())
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "eager"
    cls = cls or TextModel
    if meta["kind"] == "qa":
        from transformers import AutoModelForQuestionAnswering

        module: nn.Module = HFQuestionAnswering(AutoModelForQuestionAnswering.from_config(config))
    elif meta["kind"] == "hf":
        module = HFClassifier(AutoModelForSequenceClassification.from_config(config))
    else:
        module = MeanPoolClassifier(AutoModel.from_config(config), len(meta["labels"]), meta["normalize"])
    model = cls(module, AutoTokenizer.from_pretrained(path), meta["labels"], source=str(path))
    if meta.get("embedding_rank"):
        factorize_embeddings(model, meta["embedding_rank"])
    state = load_file(path / "model.safetensors")
    shrink_to(module, state)
    module.load_state_dict(state, strict=True)
    module.eval()
    return model


class FactorizedEmbedding(nn.Module):
    """A vocabulary x hidden embedding stored as (vocabulary x rank) @ (rank x hidden).

    Half of a small BERT's parameters are its word embeddings; a low-rank factorisation keeps
    every token (no vocabulary is cut, so no token becomes unknown) at a fraction of the size.
    """

    def __init__(self, num_embeddings: int, hidden: int, rank: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.low = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.up = nn.Linear(rank, hidden, bias=False)

    @property
    def rank(self) -> int:
        return self.low.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.low(input_ids))


def embedding_rank(model: TextModel) -> int | None:
    emb = model.module.base.get_input_embeddings()
    return emb.rank if isinstance(emb, FactorizedEmbedding) else None


def factorize_embeddings(model: TextModel, rank: int) -> dict[str, float]:
    """Replace the word embeddings by their best rank-``rank`` approximation (truncated SVD)."""
    base = model.module.base
    emb = base.get_input_embeddings()
    if isinstance(emb, FactorizedEmbedding):
        raise StageError("embeddings are already factorised")
    weight = emb.weight.detach().float()
    if not 0 < rank < min(weight.shape):
        raise InputError(f"--embedding-rank {rank}: must be between 1 and {min(weight.shape) - 1}")
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    new = FactorizedEmbedding(weight.shape[0], weight.shape[1], rank, emb.padding_idx)
    with torch.no_grad():
        new.low.weight.copy_(u[:, :rank] * sv[:rank])
        new.up.weight.copy_(vh[:rank].T)
    base.set_input_embeddings(new)
    kept = float((sv[:rank] ** 2).sum() / (sv ** 2).sum())
    return {"rank": rank, "energy_kept": kept, "parameters_before": weight.numel(),
            "parameters_after": new.low.weight.numel() + new.up.weight.numel()}


def prune_ffn(model: TextModel, rate: float) -> dict[str, int]:
    """Structured pruning of FFN channels: drop the ``rate`` least important intermediate
    neurons of every layer, so the matrices really shrink (CPU runtimes gain nothing from
    scattered zeros). Importance = |row of the up-projection| x |column of the down-projection|.
    """
    if rate <= 0:
        return {}
    before = after = 0
    for layer in model.layers():
        up = getattr(getattr(layer, "intermediate", None), "dense", None) or getattr(getattr(layer, "ffn", None), "lin1", None)
        down = getattr(getattr(layer, "output", None), "dense", None) or getattr(getattr(layer, "ffn", None), "lin2", None)
        if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
            raise StageError(f"cannot find the FFN of {type(layer).__name__} to prune")
        n = up.out_features
        k = max(1, int(round(n * (1 - rate))))
        score = up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)
        keep = torch.sort(torch.topk(score, k).indices).values
        new_up = nn.Linear(up.in_features, k, bias=up.bias is not None)
        new_down = nn.Linear(k, down.out_features, bias=down.bias is not None)
        with torch.no_grad():
            new_up.weight.copy_(up.weight[keep])
            if up.bias is not None:
                new_up.bias.copy_(up.bias[keep])
            new_down.weight.copy_(down.weight[:, keep])
            if down.bias is not None:
                new_down.bias.copy_(down.bias)
        replace_module(layer, up, new_up)
        replace_module(layer, down, new_down)
        before, after = before + n, after + k
    for attr in ("intermediate_size", "hidden_dim"):
        if hasattr(model.config, attr):
            setattr(model.config, attr, after // len(model.layers()))
    return {"ffn_channels_before": before, "ffn_channels_after": after}


def attention_parts(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear, int]:
    """(query, key, value, output projection, head size) of a BERT- or DistilBERT-style block."""
    att = getattr(layer, "attention", None)
    inner = getattr(att, "self", att)
    names = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
    qkv = next(([getattr(inner, n) for n in trio] for trio in names if all(hasattr(inner, n) for n in trio)), None)
    out = getattr(getattr(att, "output", None), "dense", None) or getattr(att, "out_lin", None)
    size = getattr(inner, "attention_head_size", None)
    if qkv is None or not isinstance(out, nn.Linear) or not size:
        raise StageError(f"cannot find the attention heads of {type(layer).__name__} to prune")
    return (*qkv, out, int(size))


def prune_heads(model: TextModel, rate: float) -> dict[str, int]:
    """Structured pruning of whole attention heads, the same number in every block (ORT fuses
    attention with one head count): the ``rate`` least important go, importance = |value rows
    of the head| x |output-projection columns of the head| (the path a head writes through).
    The attention code infers the head count from the projection width, so nothing else changes."""
    if rate <= 0:
        return {}
    before = after = 0
    for layer in model.layers():
        q, k, v, o, size = attention_parts(layer)
        heads = q.out_features // size
        n_keep = max(1, int(round(heads * (1 - rate))))
        score = v.weight.detach().view(heads, size, -1).norm(dim=(1, 2)) * \
            o.weight.detach().view(o.out_features, heads, size).norm(dim=(0, 2))
        kept = torch.sort(torch.topk(score, n_keep).indices).values
        rows = (kept[:, None] * size + torch.arange(size)).reshape(-1)
        for lin in (q, k, v):
            replace_module(layer, lin, _linear_rows(lin, rows))
        new_o = nn.Linear(len(rows), o.out_features, bias=o.bias is not None)
        with torch.no_grad():
            new_o.weight.copy_(o.weight[:, rows])
            if o.bias is not None:
                new_o.bias.copy_(o.bias)
        replace_module(layer, o, new_o)
        before, after = before + heads, after + n_keep
    return {"heads_before": before, "heads_after": after}


def _linear_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows])
    return new


def shrink_to(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every Linear, Conv2d and BatchNorm2d of a freshly built ``module`` the shape its saved
    weights have (pruned heads and channels), so ``load_state_dict`` fits a pruned model."""
    for name, old in list(module.named_modules()):
        w = state.get(f"{name}.weight")
        if w is None or not hasattr(old, "weight") or tuple(w.shape) == tuple(old.weight.shape):
            continue
        bias = f"{name}.bias" in state
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        elif isinstance(old, nn.Conv2d):  # a depthwise conv stays depthwise at its new width
            groups = w.shape[0] if old.groups == old.in_channels == old.out_channels else old.groups
            new = nn.Conv2d(w.shape[1] * groups, w.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                            groups, bias, old.padding_mode)
        elif isinstance(old, nn.BatchNorm2d):
            new = nn.BatchNorm2d(w.shape[0], old.eps, old.momentum, old.affine, old.track_running_stats)
        else:
            continue
        replace_module(module, old, new)
