"""Turn an ONNX graph into a flat list of pre-bound steps, once, at load.

What happens here (in this order) so that nothing is decided per call:
1. every op is checked against the op table; all unsupported nodes are reported at once;
2. constant folding: a node whose inputs are all constants runs now (this also dequantizes
   int8 weights behind DequantizeLinear, and turns Shape of a static shape into a constant);
   Identity and Dropout become aliases;
3. fusion (fuse.py): BatchNormalization into the preceding Conv, bias Add / residual Add / Relu /
   Clip into the producing Conv, Gemm or MatMul; QuantizeLinear->DequantizeLinear activation
   pairs into one fake-quant step; each constant weight is packed for the sparse or dense kernel;
4. values get integer slots; each step lists the slots it reads, writes, and frees after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsify.engine import ops
from sparsify.engine.fuse import MULTI_OUTPUT, Node, bind, fuse
from sparsify.errors import EngineError, UnsupportedOpError

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class Step:
    """One pre-bound call: ``fn(*vals[inputs])`` written to ``outputs``; ``free`` dropped after."""

    fn: object
    inputs: tuple
    outputs: object  # an int slot, or a tuple of slots for a multi-output op
    free: tuple
    op: str
    name: str
    native: bool  # runs in the C++ core


@dataclass
class Plan:
    steps: list
    init: list  # slot -> constant value (None for values computed at run time)
    inputs: list  # (name, slot, np.dtype, shape: tuple of int | str | None)
    outputs: list  # (name, slot)
    layers: list = field(default_factory=list)  # report rows for Conv/Gemm/MatMul with constant weights
    node_kinds: dict = field(default_factory=dict)  # original node name -> native | numpy | folded
    value_names: dict = field(default_factory=dict)  # slot -> the graph value it holds


def attributes(node) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode("utf-8") for s in v]
        out[a.name] = v
    return out


def node_name(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return 1


def check_supported(model: onnx.ModelProto) -> None:
    opset = opset_of(model)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise UnsupportedOpError(f"the model imports opset {opset} of the default domain, newer than "
                                 f"any ONNX release this engine knows (the newest is {newest}); "
                                 "export with opset 13-18")
    bad = []
    writer: dict[str, str] = {}
    for i, n in enumerate(model.graph.node):
        name = node_name(n, i)
        for out in n.output:
            if out and out in writer:
                raise EngineError(f"value {out!r} is written by node {writer[out]!r} and by node "
                                  f"{name!r}; an ONNX graph assigns each value once")
            writer[out] = name
        if n.domain not in DEFAULT_DOMAINS:
            bad.append(f"  {n.domain}::{n.op_type} (node {name!r}): custom domain {n.domain!r} is not supported")
        elif n.op_type not in ops.OPS:
            bad.append(f"  {n.op_type} (node {name!r}, opset {opset}): no kernel for this op")
        else:
            why = ops.unsupported_reason(n, opset)
            if why:
                bad.append(f"  {n.op_type} (node {name!r}, opset {opset}): {why}")
    if bad:
        raise UnsupportedOpError(
            f"the engine cannot run {len(bad)} node(s) of this graph:\n" + "\n".join(bad)
            + "\nexport with standard ops (opset 13-18) or run this model with onnxruntime")


def _value_shapes(model: onnx.ModelProto) -> dict:
    """value name -> tuple of dims (int, or str for a symbolic dim, or None) from shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as err:  # shape inference is an optimisation aid, never required
        log.info("onnx shape inference failed (%s); planning without shapes", err)
        inferred = model
    shapes = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in t.shape.dim)
    return shapes


def graph_inputs(model: onnx.ModelProto) -> list:
    """(name, numpy dtype, shape) of the inputs a caller must feed (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else None
        shape = None
        if t.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        out.append((vi.name, dtype, shape))
    return out


def _call(op_type: str, fn, inputs: list, n_out: int):
    """Evaluate one node now (constant folding); always returns a tuple of outputs."""
    r = fn(*inputs)
    return tuple(r[:n_out]) if op_type in MULTI_OUTPUT and n_out > 1 else (r,)


def fold_constants(model: onnx.ModelProto, shapes: dict):
    """Evaluate what can be evaluated now. Returns (consts, live nodes, aliases, node_kinds)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, _, _ in graph_inputs(model):
        consts.pop(name, None)  # an input that shadows an initializer is fed at run time
    graph_outs = {o.name for o in model.graph.output}
    opset = opset_of(model)
    alias, live, kinds = {}, [], {}
    for i, n in enumerate(model.graph.node):
        name = node_name(n, i)
        ins = [alias.get(x, x) for x in n.input]
        attrs = attributes(n)
        if all(x == "" or x in consts for x in ins):
            args = [consts[x] if x else None for x in ins]
            fn = bind(n.op_type, attrs, len(ins), len(n.output), opset)
            try:
                results = _call(n.op_type, fn, args, len(n.output))
            except Exception as err:
                raise EngineError(f"node {name!r} ({n.op_type}) failed while folding constants: {err}") from err
            for o, v in zip(n.output, results):
                if o:
                    consts[o] = np.asarray(v)
            kinds[name] = "folded"
            continue
        if n.op_type in ("Identity", "Dropout") and not (len(n.output) > 1 and n.output[1]) \
                and n.output[0] not in graph_outs:
            alias[n.output[0]] = ins[0]
            kinds[name] = "folded"
            continue
        if n.op_type == "Shape" and ins[0] in shapes:
            dims = shapes[ins[0]][attrs.get("start", 0):attrs.get("end")]
            if all(isinstance(d, int) and d > 0 for d in dims) and n.output[0] not in graph_outs:
                consts[n.output[0]] = np.array(dims, dtype=np.int64)
                kinds[name] = "folded"
                continue
        live.append(Node(name, n.op_type, ins, list(n.output), attrs, opset))
    return consts, live, alias, kinds


def build_plan(model: onnx.ModelProto, kind: str = "auto") -> Plan:
    check_supported(model)
    shapes = _value_shapes(model)
    consts, live, alias, kinds = fold_constants(model, shapes)
    graph_outs = [alias.get(o.name, o.name) for o in model.graph.output]
    steps_src, layers = fuse(live, consts, shapes, set(graph_outs), kind)

    feeds = graph_inputs(model)
    slots: dict[str, int] = {}
    init: list = [None]  # slot 0 receives outputs nobody reads

    def slot(name: str) -> int:
        if name == "":
            return 0
        if name not in slots:
            slots[name] = len(init)
            init.append(consts.get(name))
        return slots[name]

    for name, _, _ in feeds:
        slot(name)
    defined = set(slots) | set(consts)
    resolved = []
    for s in steps_src:
        for x in s.inputs:
            if x and x not in defined:
                raise EngineError(f"node {s.name!r} ({s.op}) reads {x!r}, which no earlier node, "
                                  "initializer or graph input defines (is the graph sorted?)")
        resolved.append((s, tuple(slot(x) for x in s.inputs), tuple(slot(o) for o in s.outputs)))
        defined.update(s.outputs)
        for source in s.sources:
            kinds[source] = "native" if s.native else "numpy"
    missing = [o for o in graph_outs if o not in defined]
    if missing:
        raise EngineError(f"graph outputs {missing} are never computed by any node")
    out_slots = [(o.name, slot(alias.get(o.name, o.name))) for o in model.graph.output]

    # free each run-time value after its last reader (graph outputs are kept)
    keep = {s for _, s in out_slots} | {0}
    last = {}
    for i, (_, ins, _) in enumerate(resolved):
        for x in ins:
            last[x] = i
    frees = [[] for _ in resolved]
    for x, i in last.items():
        if x not in keep:
            frees[i].append(x)
    steps = []
    for (s, ins, outs), free in zip(resolved, frees):
        out = outs if s.multi else outs[0]
        steps.append(Step(s.fn, ins, out, tuple(free), s.op, s.name, s.native))
    inputs = [(name, slots[name], dtype, shape) for name, dtype, shape in feeds]
    return Plan(steps, init, inputs, out_slots, layers, kinds,
                {index: name for name, index in slots.items()})
