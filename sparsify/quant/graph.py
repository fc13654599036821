"""Find Conv->BN pairs and the tensor each quantized unit produces (torch.fx, order fallback).

A "unit" is what becomes one INT8 kernel after export: Conv2d [+ BatchNorm2d] [+ ReLU/ReLU6], or
Linear. The fx graph tells us (1) which BN follows which conv, (2) whether a unit's output feeds
something other than another quantized layer (a residual Add, pooling, the graph output); only
then does the unit need its own output observer, which lets onnxruntime fuse the conv into
QLinearConv. Models fx cannot trace fall back to module order (conv immediately followed by a
BatchNorm2d of the same width in the same parent) and get no output observers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

_RELU_FUNCS = {torch.relu, torch.relu_, F.relu, F.relu6}
_BN = (nn.BatchNorm2d,)


@dataclass
class UnitInfo:
    bn: str | None = None
    # module whose output is the unit's output (hooked by the output observer), and the
    # activation folded into it ("relu", "relu6" or None)
    out_module: str | None = None
    out_act: str | None = None
    needs_output: bool = False


@dataclass
class InputInfo:
    """How a quantized layer's input tensor is shared.

    ``owner``: the quantized layer whose input observer serves every quantized consumer of this
    tensor (itself if first). ``from_unit``: a conv whose output observer already quantizes the
    tensor. ``source``: a module (called once) whose output is the tensor, hooked so that every
    consumer, not only the quantized ones, sees the quantized value, as in the ONNX graph where
    a residual Add reads the same DequantizeLinear output as the conv. ``all_consumers``: False
    when other ops read the tensor and neither applies (they then read it unquantized).
    """

    owner: str
    from_unit: str | None = None
    source: str | None = None
    all_consumers: bool = True


@dataclass
class GraphInfo:
    units: dict[str, UnitInfo] = field(default_factory=dict)
    inputs: dict[str, InputInfo] = field(default_factory=dict)
    traced: bool = False


def _act_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and m.min_val == 0 and m.max_val == 6):
            return "relu6"
    elif node.op == "call_function" and node.target in _RELU_FUNCS:
        return "relu6" if node.target is F.relu6 else "relu"
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def analyze(model: nn.Module, quantized: set[str]) -> GraphInfo:
    """Units for every Conv2d/Linear in ``model`` (BN pairs for all convs, quantized or not)."""
    modules = dict(model.named_modules())
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx cannot trace data-dependent control flow; that is expected
        log.info("torch.fx could not trace %s (%s); pairing Conv->BN by module order",
                 type(model).__name__, str(err).splitlines()[0][:120])
        return _by_order(model)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    info = GraphInfo(traced=True)
    unit_out: dict[torch.fx.Node, str] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or type(modules.get(n.target)) not in (nn.Conv2d, nn.Linear):
            continue
        if calls[n.target] != 1:
            continue  # a layer called twice has two inputs to observe; leave it unpaired
        unit = UnitInfo()
        cur = n
        conv = modules[n.target]
        u = _only_user(cur)
        if (type(conv) is nn.Conv2d and u is not None and u.op == "call_module"
                and isinstance(modules.get(u.target), _BN) and calls[u.target] == 1
                and modules[u.target].num_features == conv.out_channels):
            unit.bn, cur = u.target, u
        u = _only_user(cur)
        act = _act_kind(u, modules) if u is not None else None
        out = u if act is not None else cur
        # the observer hooks the conv/BN output (a module called once) and clamps what it sees
        # to the activation's range, so fake-quant(x) == fake-quant(relu(x)): shared or
        # functional ReLUs need no hook of their own
        unit.out_module, unit.out_act = cur.target, act
        # only convs get output observers: onnxruntime's QLinearConv needs a quantized output,
        # while a Linear's MatMul/Gemm runs INT8 with a float output (MatMulIntegerToFloat,
        # QGemm), and in ONNX its output often sits behind a separate bias Add
        unit.needs_output = type(conv) is nn.Conv2d and any(
            not (v.op == "call_module" and v.target in quantized) for v in out.users
        )
        info.units[n.target] = unit
        unit_out[out] = n.target
    _share_inputs(gm, modules, calls, quantized, info, unit_out)
    return info


def _scope(node: torch.fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack", {}).keys())


def _source_module(node: torch.fx.Node, last: dict[str, torch.fx.Node],
                   modules: dict[str, nn.Module]) -> str | None:
    """The innermost module (called once) whose forward returns ``node``."""
    for path in reversed(_scope(node)):
        if "@" in path or path not in modules:  # "@1": the module's second call
            continue
        if last.get(path) is node and all(path not in _scope(u) for u in node.users):
            return path
    return None


def _share_inputs(gm, modules, calls, quantized, info: GraphInfo, unit_out) -> None:
    last: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        for path in _scope(node):
            last[path] = node
    owners: dict[torch.fx.Node, str] = {}
    for n in gm.graph.nodes:
        if not (n.op == "call_module" and n.target in quantized and calls[n.target] == 1):
            continue
        x = n.args[0] if n.args else None
        if not isinstance(x, torch.fx.Node):
            continue
        if x in owners:
            info.inputs[n.target] = info.inputs[owners[x]]
            continue
        owners[x] = n.target
        entry = InputInfo(owner=n.target)
        others = [u for u in x.users if not (u.op == "call_module" and u.target in quantized)]
        producer = unit_out.get(x)
        if producer is not None and info.units[producer].needs_output:
            entry.from_unit = producer
        elif others:
            entry.source = _source_module(x, last, modules)
            entry.all_consumers = entry.source is not None
        info.inputs[n.target] = entry


def _by_order(model: nn.Module) -> GraphInfo:
    info = GraphInfo(traced=False)
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (name, m), (next_name, nxt) in zip(children, children[1:] + [(None, None)]):
            if type(m) not in (nn.Conv2d, nn.Linear):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            unit = UnitInfo()
            if (type(m) is nn.Conv2d and isinstance(nxt, _BN)
                    and nxt.num_features == m.out_channels):
                unit.bn = f"{parent_name}.{next_name}" if parent_name else next_name
            info.units[full] = unit
    return info
