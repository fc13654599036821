"""Insert, schedule, read out and remove fake quantization on a torch model."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from sparsify.errors import RecipeError
from sparsify.quant import graph
from sparsify.quant.modules import (
    FLOAT_CLASSES, QUANT_CLASSES, FrozenBatchNorm2d, export_weight, folded, is_quantized,
    remove_quant_hooks,
)
from sparsify.quant.observer import ActQuant

log = logging.getLogger(__name__)

STATE_FORMAT = "sparsify.quant/1"

# layer types with weights that have no INT8 path here, and why (they stay FP32, reported)
_FALLBACK_REASONS = {
    "MultiheadAttention": "its projections are applied functionally (F.multi_head_attention_"
    "forward), so fake-quant cannot wrap them; write attention with nn.Linear to quantize it",
    "Embedding": "a lookup table, not a matmul; it stays FP32",
    "ConvTranspose2d": "no INT8 transposed-conv path is implemented",
    "Conv1d": "only Conv2d convolutions are quantized",
    "Conv3d": "only Conv2d convolutions are quantized",
}


@dataclass(frozen=True)
class QuantScheme:
    """What we implement: int8 symmetric weights (per channel or per tensor), uint8 activations."""

    weight_per_channel: bool = True
    act_symmetric: bool = False

    def describe(self) -> dict:
        return {
            "weights": {"num_bits": 8, "symmetric": True,
                        "strategy": "channel" if self.weight_per_channel else "tensor"},
            "input_activations": {"num_bits": 8, "symmetric": self.act_symmetric,
                                  "strategy": "tensor"},
        }


def _matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or type(module).__name__ == pattern


def _is_type_name(pattern: str) -> bool:
    return not pattern.startswith("re:") and pattern[:1].isupper() and "." not in pattern


def select_modules(model: nn.Module, targets: Iterable[str] | None = None,
                   ignore: Iterable[str] = ()) -> tuple[list[str], list[str], list[dict]]:
    """(names to quantize, names ignored, fallback report) for ``model``.

    Raises RecipeError for a name or ``re:`` regex in ``targets``/``ignore`` that matches no
    module; a type name that matches nothing is only logged (recipes list generic types).
    """
    modules = dict(model.named_modules())
    ignore, targets = list(ignore), (list(targets) if targets else None)
    for field, pats in (("ignore", ignore), ("targets", targets or [])):
        for p in pats:
            if not any(_matches(n, m, p) for n, m in modules.items() if n):
                if _is_type_name(p):
                    log.info("quantization %s entry %r matches no module", field, p)
                    continue
                close = [n for n in modules if n and (p.split(":")[-1] in n)][:3]
                raise RecipeError(
                    f"quantization {field} entry {p!r} matches no module of "
                    f"{type(model).__name__}" + (f" (similar names: {close})" if close else
                                                 "; use a module name, 're:REGEX' or a type name")
                )
    chosen, ignored, fallback = [], [], []
    skip_prefixes: list[str] = []
    for name, m in modules.items():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if any(_matches(name, m, p) for p in ignore):
            ignored.append(name)
            skip_prefixes.append(name + ".")
            continue
        if targets is not None and not any(_matches(name, m, p) for p in targets):
            continue
        if type(m) in QUANT_CLASSES or is_quantized(m):
            chosen.append(name)
            continue
        own = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
        if own or type(m).__name__ == "MultiheadAttention":
            kind = type(m).__name__
            reason = _FALLBACK_REASONS.get(kind, "no INT8 path for this layer type")
            fallback.append({"name": name, "type": kind, "reason": reason})
            skip_prefixes.append(name + ".")
    return chosen, ignored, fallback


def prepare(model: nn.Module, scheme: QuantScheme = QuantScheme(),
            targets: Iterable[str] | None = None, ignore: Iterable[str] = ()) -> dict:
    """Insert fake quantization into ``model`` in place; returns the report stored on it.

    Every layer with weights that is neither quantized nor ignored is listed in
    ``report["fallback"]`` (it stays FP32) and logged as a warning.
    """
    if getattr(model, "_sparsify_quant", None) is not None:
        return model._sparsify_quant
    chosen, ignored, fallback = select_modules(model, targets, ignore)
    modules = dict(model.named_modules())
    info = graph.analyze(model, set(chosen))
    for name in chosen:
        m = modules[name]
        m.__class__ = QUANT_CLASSES[type(m)]
        m._init_quant(scheme.weight_per_channel, scheme.act_symmetric)
        unit = info.units.get(name)
        if unit is None:
            continue
        if unit.bn is not None:
            object.__setattr__(m, "_bn", modules[unit.bn])
        if unit.needs_output and unit.out_module is not None:
            m.output_quant = ActQuant(symmetric=scheme.act_symmetric, act=unit.out_act)
            modules[unit.out_module].register_forward_hook(m.output_quant.hook)
            object.__setattr__(m, "_out_act", unit.out_act)
    _share_input_observers(modules, info)
    for fb in fallback:
        log.warning("INT8 fallback: %s (%s) stays FP32: %s", fb["name"], fb["type"], fb["reason"])
    report = {"scheme": scheme.describe(), "fallback": fallback, "ignored": ignored,
              "bn": {n: info.units[n].bn for n in chosen if n in info.units and info.units[n].bn},
              "traced": info.traced}
    model._sparsify_quant = report
    log.info("fake quantization on %d layers (%d with folded BN, %d output observers)",
             len(chosen), len(report["bn"]),
             sum(modules[n].output_quant is not None for n in chosen))
    return report


def _share_input_observers(modules: dict[str, nn.Module], info: graph.GraphInfo) -> None:
    """One observer per input tensor, applied where every consumer sees it (graph.InputInfo)."""
    for name, inp in info.inputs.items():
        m, owner = modules[name], modules[inp.owner]
        if inp.from_unit is not None:
            aq = modules[inp.from_unit].output_quant
        else:
            aq = owner.input_quant
            if inp.source is not None and name == inp.owner:
                modules[inp.source].register_forward_hook(aq.hook)
        m.input_quant = aq
        object.__setattr__(m, "_prequantized", inp.from_unit is not None or inp.source is not None)
        object.__setattr__(m, "_input_all_consumers", inp.all_consumers)


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_quantized(m)}


def act_quants(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


def set_observing(model: nn.Module, enabled: bool) -> None:
    """Turn all observers (activation ranges and weight scales) on or off; off fixes scales."""
    for aq in act_quants(model):
        aq.observing = enabled
    for m in quant_layers(model).values():
        m.weight_observing = enabled


def set_quantizing(model: nn.Module, enabled: bool) -> None:
    for aq in act_quants(model):
        aq.quantizing = enabled


def freeze_bn_stats(model: nn.Module) -> int:
    """BNs folded into quantized convs stop updating and normalize with running statistics."""
    n = 0
    for m in quant_layers(model).values():
        bn = m._bn
        if bn is not None and type(bn) is nn.BatchNorm2d:
            bn.__class__ = FrozenBatchNorm2d
            n += 1
    return n


def _sha1(a: torch.Tensor) -> str:
    return hashlib.sha1(np.ascontiguousarray(a.detach().cpu().numpy()).tobytes()).hexdigest()


def quantization_state(model: nn.Module) -> dict:
    """Everything ``sparsify.qdq.to_qdq`` needs, JSON-serializable.

    ``layers[name]``: ``weight`` (parameter name), ``weight_scale`` (list, one per output
    channel; zero-point 0, int8 [-127, 127]), ``input_scale``/``input_zero_point`` (uint8),
    optional ``output_scale``/``output_zero_point``/``output_act``, ``bn`` (the folded BN or
    None), and ``weight_sha1``/``weight_t_sha1`` of the exported FP32 weight (and its
    transpose), used to find renamed initializers in the ONNX file.
    """
    report = getattr(model, "_sparsify_quant", None)
    if report is None:
        raise RecipeError("model has no quantization structure: run calibrate() or a recipe "
                          "with a QuantizationModifier first")
    layers = {}
    for name, m in quant_layers(model).items():
        w, _, scale = export_weight(m)
        aq = m.input_quant
        if not aq.initialized:
            raise RecipeError(f"layer {name} has no observed input range: run calibrate() or "
                              f"train with the QuantizationModifier before exporting")
        entry = {
            "type": FLOAT_CLASSES[type(m)].__name__,
            "weight": f"{name}.weight",
            "bias": f"{name}.bias" if (m.bias is not None or m._bn is not None) else None,
            "weight_shape": list(w.shape),
            "weight_scale": [float(s) for s in scale],
            "input_scale": float(aq.scale), "input_zero_point": int(aq.zero_point),
            # False: ops other than quantized layers read this input unquantized (in torch)
            "input_all_consumers": getattr(m, "_input_all_consumers", True),
            "bn": report["bn"].get(name),
            "weight_sha1": _sha1(w),
            "weight_t_sha1": _sha1(w.t().contiguous()) if w.dim() == 2 else None,
        }
        oq = m.output_quant
        if oq is not None and oq.initialized:
            entry.update(output_scale=float(oq.scale), output_zero_point=int(oq.zero_point),
                         output_act=getattr(m, "_out_act", None))
        layers[name] = entry
    return {"format": STATE_FORMAT, **report["scheme"], "layers": layers,
            "fallback": list(report["fallback"]), "ignored": list(report["ignored"]),
            "fp32_ops": ["attention MatMuls between activations", "Softmax", "LayerNorm",
                         "GELU", "Add/Mul without weights"]}


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """A copy of ``model`` ready for ONNX export: plain FP32 modules, BN folded into the convs,
    quantized weights rounded onto their int8 grid (so FP32 output == dequantized INT8 output),
    observers and hooks removed. Works on unquantized models too (then it only folds BN)."""
    model = copy.deepcopy(model)
    report = getattr(model, "_sparsify_quant", None)
    if report is None:
        return fold_batchnorm(model)
    for name, m in quant_layers(model).items():
        w, b, _ = export_weight(m)
        bn = m._bn
        del m.input_quant, m.weight_scale
        if m.output_quant is not None:
            del m.output_quant
        for attr in ("output_quant", "per_channel", "weight_observing", "_bn", "_prequantized",
                     "_out_act", "_input_all_consumers"):
            m.__dict__.pop(attr, None)
        m.__class__ = FLOAT_CLASSES[type(m)]
        m.weight.data = w
        if b is not None:
            m.bias = nn.Parameter(b, requires_grad=m.weight.requires_grad)
        if bn is not None:
            _set_child(model, report["bn"][name], nn.Identity())
    for m in model.modules():
        remove_quant_hooks(m)
    del model._sparsify_quant
    return fold_batchnorm(model)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d->BatchNorm2d pair of ``model`` (in place; BN becomes Identity)."""
    info = graph.analyze(model, set())
    modules = dict(model.named_modules())
    for name, unit in info.units.items():
        conv = modules[name]
        if unit.bn is None or type(conv) is not nn.Conv2d:
            continue
        object.__setattr__(conv, "_bn", modules[unit.bn])
        w, b = folded(conv)
        conv.__dict__.pop("_bn")
        conv.weight.data = w
        conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        _set_child(model, unit.bn, nn.Identity())
    return model
