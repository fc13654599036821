"""Fusion and weight packing: graph nodes (after constant folding) -> pre-bound step sources.

A Conv, Gemm or MatMul with a constant float32 weight becomes one kernel call that also does
what follows it when nobody else reads the intermediate value:

    Conv -> [BatchNormalization] -> [Add(bias)] -> [Add(residual)] -> [Relu | Clip | GELU]
    Gemm / MatMul -> [Add(bias)] -> [Add(residual)] -> [Relu | Clip | GELU]

(GELU: the ONNX Gelu op with approximate="none", or the Div/Erf/Add/Mul/Mul chain torch
writes out, whose input has two readers inside the chain.)

(the bias and residual Adds may come in either order). The fused step runs where the last
absorbed node stood, so the residual operand is always computed by then. A residual needs shapes
that inference proves equal, except for Gemm/MatMul, whose step then checks them per call. The weight is packed
once with ``kernels.PackedWeight.pack(w, kind)``; "auto" lets the core pick sparse or dense from
the weight's measured sparsity. A QuantizeLinear whose consumers are DequantizeLinear with the
same per-tensor parameters becomes one fake-quant step per consumer (float round/clip, the
values onnxruntime's QDQ arithmetic produces). Transformer blocks (attention, feed-forward
chains, their LayerNormalization, a feature-major residual stream) are fused by
fuse_transformer.py on top of these steps.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

import numpy as np

from sparsify.engine import kernels, ops, reference
from sparsify.engine.ops_nn import conv_geometry, fake_quantize, layer_norm_y
from sparsify.errors import EngineError

# ops that return a tuple of outputs (a node may use only the first ones)
MULTI_OUTPUT = {"LayerNormalization", "Dropout", "Split", "TopK"}


@dataclass
class Node:
    name: str
    op: str
    inputs: list
    outputs: list
    attrs: dict
    opset: int


@dataclass
class StepSrc:
    name: str
    op: str
    inputs: list
    outputs: list
    fn: object
    multi: bool = False
    native: bool = False
    sources: list = field(default_factory=list)  # names of the graph nodes this step executes
    linear: tuple | None = None  # a linear layer's (packed weight, bias, act, residual?, guarded?)
    attention: tuple | None = None  # an attention step's (heads, scale)
    norm: tuple | None = None  # a last-axis LayerNormalization's (scale, bias, epsilon)
    block: tuple | None = None  # a block's (fn for feature-major flags, has a residual?)
    into_residual: object = None  # a residual layer's fn writing into its residual (input 1)


def bind(op_type: str, attrs: dict, n_inputs: int, n_outputs: int, opset: int):
    """The op's function with attributes bound, trimmed to the outputs the node uses."""
    fn = ops.op_function(op_type, opset)
    if op_type == "Split" and "num_outputs" not in attrs:
        attrs = dict(attrs, num_outputs=n_outputs)
    try:
        inspect.signature(fn).bind(*([None] * n_inputs), **attrs)
    except TypeError as err:
        raise EngineError(f"{op_type}: unexpected inputs or attributes ({err})") from None
    if op_type == "LayerNormalization" and n_outputs == 1:
        fn = layer_norm_y  # skips the mean / inv_std outputs nobody reads
    f = functools.partial(fn, **attrs) if attrs else fn
    if op_type in MULTI_OUTPUT and n_outputs == 1 and fn is not layer_norm_y:
        return lambda *a: f(*a)[0]
    return f



def _const(consts, name):
    return consts.get(name) if name else None


def _is_f32_weight(w) -> bool:
    return w is not None and w.dtype == np.float32


def fuse(nodes: list, consts: dict, shapes: dict, graph_outs: set, kind: str):
    """Returns (list of StepSrc in execution order, report rows for packed layers)."""
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.inputs:
            if x:
                readers.setdefault(x, []).append(i)

    def sole_reader(value):
        """The node index that is the only reader of ``value``, or None."""
        r = readers.get(value, [])
        if value in graph_outs or len(r) != 1 or r[0] in absorbed:
            return None
        return r[0]

    def all_readers(value):
        """Every node index reading ``value`` (None when it is a graph output or absorbed)."""
        r = readers.get(value, [])
        if value in graph_outs or any(k in absorbed for k in r):
            return None
        return r

    absorbed: set[int] = set()
    placed: list[tuple[int, StepSrc]] = []
    layers = []
    # attention first: its head-splitting Reshape/Transpose nodes come before the MatMul that
    # reveals the pattern, and the main loop below places nodes in order
    from sparsify.engine import fuse_transformer as tf  # it builds on this module's StepSrc

    producer = {o: k for k, nd in enumerate(nodes) for o in nd.outputs if o}
    for i, n in enumerate(nodes):
        if n.op == "MatMul" and i not in absorbed:
            got = tf.fuse_attention(i, n, nodes, consts, shapes, producer, readers, graph_outs,
                                    sole_reader)
            if got:
                pos, src, used = got
                absorbed.update(used)
                placed.append((pos, src))
    for i, n in enumerate(nodes):
        if i in absorbed:
            continue
        fused = None
        if n.op in ("Conv", "Gemm", "MatMul"):
            fused = _fuse_compute(i, n, nodes, consts, shapes, sole_reader, all_readers, kind,
                                  layers)
        elif n.op == "QuantizeLinear":
            fused = _fuse_qdq(i, n, nodes, consts, readers, graph_outs)
        elif n.op in ("Div", "Mul"):
            fused = _fuse_gelu(i, n, nodes, consts, sole_reader)
        elif n.op == "BatchNormalization":
            fused = _fuse_batchnorm(i, n, nodes, consts, sole_reader)
        if fused:
            for pos, src, used in fused:
                absorbed.update(used)
                placed.append((pos, src))
            continue
        fn = bind(n.op, n.attrs, len(n.inputs), len(n.outputs), n.opset)
        src = StepSrc(n.name, n.op, n.inputs, n.outputs, fn,
                      multi=n.op in MULTI_OUTPUT and len(n.outputs) > 1,
                      native=ops.runs_native(n.op, n.attrs, n.opset), sources=[n.name])
        src.norm = tf.row_norm(n, consts)
        placed.append((i, src))
    placed.sort(key=lambda p: p[0])  # stable: a fused step lands where its last node stood
    steps = tf.chain_linears(tf.attention_blocks([s for _, s in placed], graph_outs), graph_outs)
    tf.feature_major_streams(steps, graph_outs)
    reuse_buffers(steps, shapes, graph_outs)
    return steps, layers


# ---------------------------------------------------------------- BatchNormalization on its own
def _fuse_batchnorm(i, n: Node, nodes, consts, sole_reader):
    """An inference BatchNormalization that no conv absorbed (DenseNet's pre-activation, a BN
    after a Concat or an Add), with the activation after it, as one native pass
    ``act(x * s[c] + t[c])``: NumPy's took two passes and a temporary per op."""
    st = _bn_affine(n, consts)
    if st is None:
        return None
    s, t = st
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    used, out, act = [i], n.outputs[0], "none"
    j = sole_reader(out)
    if j is not None and (a := _act_of(nodes[j], consts)) is not None:
        used.append(j)
        act, out = a, nodes[j].outputs[0]

    def run(x):
        if x.dtype == np.float32:
            return kernels.channel_affine(x, s32, t32, act)
        shape = (1, -1) + (1,) * (x.ndim - 2)  # other float types keep their dtype
        y = x * s.astype(x.dtype).reshape(shape) + t.astype(x.dtype).reshape(shape)
        return reference.apply_act(y, act).astype(x.dtype)

    op = "+".join(nodes[k].op for k in used)
    src = StepSrc("+".join(nodes[k].name for k in used), op, [n.inputs[0]], [out], run,
                  native=True, sources=[nodes[k].name for k in used])
    return [(used[-1], src, used)]


# ---------------------------------------------------------------- GELU written out (torch export)
def _scalar(consts, name):
    v = _const(consts, name)
    return float(v.reshape(())) if v is not None and v.size == 1 and v.dtype.kind == "f" else None


def _fuse_gelu(i, n, nodes, consts, sole_reader):
    """x / sqrt(2) (or x * 1/sqrt(2)) -> Erf -> + 1 -> * x -> * 0.5  ==>  one Gelu step."""
    got = _gelu_chain(i, n, nodes, consts, sole_reader)
    if got is None:
        return None
    chain, x, out = got
    src = StepSrc("+".join(nodes[k].name for k in chain), "Gelu", [x], [out], ops.OPS["Gelu"],
                  sources=[nodes[k].name for k in chain])
    return [(chain[-1], src, chain)]


def _gelu_chain(i, n, nodes, consts, sole_reader):
    """(node indices, x, output) of a written-out GELU starting at node i, or None."""
    if n.op not in ("Div", "Mul") or len(n.inputs) != 2:
        return None
    x, c = n.inputs[0], _scalar(consts, n.inputs[1])
    want = math.sqrt(2) if n.op == "Div" else 1 / math.sqrt(2)
    if c is None or abs(c - want) > 1e-6 * want or x in consts:
        return None
    chain, out = [i], n.outputs[0]
    for op, check in (("Erf", lambda m: True),
                      ("Add", lambda m: _scalar(consts, _other(m, out)) == 1.0),
                      ("Mul", lambda m: _other(m, out) == x),
                      ("Mul", lambda m: _scalar(consts, _other(m, out)) == 0.5)):
        j = sole_reader(out)
        if j is None or nodes[j].op != op or not check(nodes[j]):
            return None
        chain.append(j)
        out = nodes[j].outputs[0]
    return chain, x, out


def _other(node: Node, value: str) -> str:
    return node.inputs[1] if node.inputs[0] == value else node.inputs[0]


# ---------------------------------------------------------------- buffer reuse
def reuse_buffers(steps: list, shapes: dict, graph_outs: set) -> None:
    """Let elementwise steps write into an input buffer that nobody reads afterwards.

    Allowed when the input was made by a step that returns a fresh array (never a view of
    something else), this step is its only reader, and the inferred shapes of input and
    output are equal and fully known.
    """
    producer, readers = {}, {}
    for s in steps:
        for x in s.inputs:
            readers[x] = readers.get(x, 0) + 1
        for o in s.outputs:
            producer[o] = s
    for s in steps:
        variants = ops.INPLACE.get(s.op)
        if variants is None or s.multi:
            continue
        out_shape = shapes.get(s.outputs[0])
        if not out_shape or None in out_shape:
            continue
        for pos, make in variants.items():
            if pos >= len(s.inputs):
                continue
            x = s.inputs[pos]
            p = producer.get(x)
            if p is None or x in graph_outs or readers.get(x) != 1 or shapes.get(x) != out_shape:
                continue
            if not (p.native or p.op in ops.FRESH) or p.multi:
                continue
            fn = make(s.fn)
            if fn is not None:
                s.fn = fn
                s.name += " (in place)"
                break
    # A residual conv writes into its residual's buffer when it is that value's last reader (a
    # ResNet block's input is read by its first conv too): the output then goes to memory the
    # layer reads anyway, not to a fresh buffer not in cache (measured: 17% of such a layer).
    # Its other readers must be native steps, whose outputs are never views of it.
    last = {}
    for i, s in enumerate(steps):
        for x in s.inputs:
            last[x] = i
    for i, s in enumerate(steps):
        if s.into_residual is None or len(s.inputs) < 2:
            continue
        r = s.inputs[1]
        p = producer.get(r)
        out_shape = shapes.get(s.outputs[0])
        if (p is None or r in graph_outs or last.get(r) != i or s.inputs.count(r) != 1
                or not out_shape or None in out_shape or shapes.get(r) != out_shape
                or not (p.native or p.op in ops.FRESH) or p.multi):
            continue
        if all(t.native for t in steps if t is not s and r in t.inputs):
            s.fn = s.into_residual
            s.name += " (in place)"


# ---------------------------------------------------------------- Conv / Gemm / MatMul
def _weight_of(n: Node, consts: dict):
    """(w2d [out, in] float32, bias or None, conv params or None) if n has a constant weight."""
    if n.op == "Conv":
        w = _const(consts, n.inputs[1])
        if not _is_f32_weight(w) or w.ndim != 4:
            return None
        b = _const(consts, n.inputs[2]) if len(n.inputs) > 2 else None
        if len(n.inputs) > 2 and n.inputs[2] and b is None:
            return None
        return w, b
    if n.op == "Gemm":
        b = _const(consts, n.inputs[1])
        a = n.attrs
        if not _is_f32_weight(b) or b.ndim != 2 or a.get("transA", 0) or n.inputs[0] in consts:
            return None
        w = (b if a.get("transB", 0) else b.T) * np.float32(a.get("alpha", 1.0))
        bias = None
        if len(n.inputs) > 2 and n.inputs[2]:
            c = _const(consts, n.inputs[2])
            if c is None or c.dtype != np.float32 or c.size not in (1, w.shape[0]) or c.ndim > 2 \
                    or (c.ndim == 2 and c.shape[0] != 1):
                return None
            bias = np.broadcast_to(c.reshape(-1) * np.float32(a.get("beta", 1.0)), (w.shape[0],))
        return np.ascontiguousarray(w, np.float32), bias
    if n.op == "MatMul":
        b = _const(consts, n.inputs[1])
        if not _is_f32_weight(b) or b.ndim != 2 or n.inputs[0] in consts:
            return None
        return np.ascontiguousarray(b.T), None
    return None


def _bias_from(c, m: int, conv: bool):
    """A constant Add operand as a per-output-channel bias of length m, else None."""
    if c is None or c.dtype != np.float32:
        return None
    if c.size == 1 and c.ndim <= (4 if conv else 1):
        return np.full(m, c.reshape(()), np.float32)
    if conv and c.shape in ((m, 1, 1), (1, m, 1, 1)):
        return c.reshape(m)
    if not conv and c.shape == (m,):
        return c
    return None


def _act_of(n: Node, consts: dict):
    if n.op == "Relu":
        return "relu"
    if n.op == "Gelu" and n.attrs.get("approximate", "none") == "none":
        return "gelu"
    if n.op == "Sigmoid":
        return "sigmoid"
    if n.op == "HardSigmoid":
        return ("hardsigmoid", float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5)))
    if n.op == "HardSwish":
        return ("hardswish", 1.0 / 6.0, 0.5)
    if n.op == "Clip":
        lo, hi = n.attrs.get("min", -np.inf), n.attrs.get("max", np.inf)
        for k, x in enumerate(n.inputs[1:3]):
            if x:
                v = _const(consts, x)
                if v is None:
                    return None
                lo, hi = (float(v), hi) if k == 0 else (lo, float(v))
        return ("clip", float(lo), float(hi))
    return None


def _bn_affine(bn: Node, consts):
    """An inference BatchNormalization as float64 (s, t) with y = x * s[c] + t[c], or None when
    its parameters are not constants or it trains."""
    vals = [_const(consts, x) for x in bn.inputs[1:5]]
    if any(v is None for v in vals) or bn.attrs.get("training_mode", 0) or any(bn.outputs[1:]):
        return None
    scale, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in vals)
    if not scale.size == beta.size == mean.size == var.size:
        return None
    with np.errstate(invalid="ignore"):  # a negative variance gives NaN, as at run time
        s = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    return s, beta - mean * s


def _fold_bn(w, b, bn: Node, consts):
    """Conv weight/bias with the following inference BatchNormalization folded in, or None."""
    st = _bn_affine(bn, consts)
    if st is None:
        return None
    s, t = st
    b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    w = (w.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(np.float32)
    return w, (b0 * s + t).astype(np.float32)


def _swish_after(out, nodes, sole_reader, all_readers):
    """``out * Sigmoid(out)`` (SiLU, as torch exports it) or ``out * HardSigmoid(out)``
    (HardSwish) when nothing else reads ``out``: (indices, act, output) or None."""
    r = all_readers(out)
    if not r or len(r) != 2:
        return None
    for j in r:
        gate = nodes[j]
        if gate.op not in ("Sigmoid", "HardSigmoid") or gate.inputs[0] != out:
            continue
        k = sole_reader(gate.outputs[0])
        if k is None or sorted(r) != sorted((j, k)):
            continue
        mul = nodes[k]
        if mul.op != "Mul" or sorted(mul.inputs) != sorted((out, gate.outputs[0])):
            continue
        if gate.op == "Sigmoid":
            return (j, k), "silu", mul.outputs[0]
        alpha, beta = float(gate.attrs.get("alpha", 0.2)), float(gate.attrs.get("beta", 0.5))
        return (j, k), ("hardswish", alpha, beta), mul.outputs[0]
    return None


def _gelu_after(out, nodes, consts, sole_reader, all_readers):
    """The written-out GELU of ``out`` when nothing else reads ``out``: (indices, output) or None.

    ``out`` has two readers there (the scaling Div/Mul and the ``* x``), so sole_reader cannot
    see it."""
    r = all_readers(out)
    if not r or len(r) != 2:
        return None
    for j in r:
        got = _gelu_chain(j, nodes[j], nodes, consts, sole_reader)
        if got is not None and got[1] == out and sorted(r) == sorted((got[0][0], got[0][3])):
            return got[0], got[2]
    return None


def _fuse_compute(i, n, nodes, consts, shapes, sole_reader, all_readers, kind, layers):
    got = _weight_of(n, consts)
    if got is None:
        return None
    w, bias = got
    conv = n.op == "Conv"
    used, sources, extra_in = [i], [n.name], []
    act, residual, guarded = "none", None, False
    out = n.outputs[0]
    if conv:
        j = sole_reader(out)
        if j is not None and nodes[j].op == "BatchNormalization":
            folded = _fold_bn(w, bias, nodes[j], consts)
            if folded:
                w, bias = folded
                used.append(j), sources.append(nodes[j].name)
                out = nodes[j].outputs[0]
    m = w.shape[0]
    group = n.attrs.get("group", 1)
    depthwise = conv and group > 1 and w.shape[1] == 1 and group == m
    while True:
        j = sole_reader(out)
        if j is None:
            break
        nj = nodes[j]
        if nj.op == "Add":
            other = nj.inputs[1] if nj.inputs[0] == out else nj.inputs[0]
            c = _bias_from(_const(consts, other), m, conv)
            if c is not None:
                bias = c.copy() if bias is None else bias + c
            elif other in consts or residual is not None or depthwise:
                break
            elif shapes.get(nj.outputs[0]) and shapes.get(nj.outputs[0]) == shapes.get(out) == shapes.get(other) \
                    and None not in shapes[out]:
                residual = other
            elif not conv:  # shapes not provably equal: the step checks them on each call
                residual, guarded = other, True
            else:
                break
        elif (a := _act_of(nj, consts)) is not None:
            act = a
        else:
            break
        used.append(j), sources.append(nj.name)
        out = nj.outputs[0]
        if act != "none":
            break
    if act == "none" and not depthwise:
        gelu = _gelu_after(out, nodes, consts, sole_reader, all_readers)
        if gelu is not None:
            act = "gelu"
            used.extend(gelu[0]), sources.extend(nodes[k].name for k in gelu[0])
            out = gelu[1]
    if act == "none":
        swish = _swish_after(out, nodes, sole_reader, all_readers)
        if swish is not None:
            act = swish[1]
            used.extend(swish[0]), sources.extend(nodes[k].name for k in swish[0])
            out = swish[2]
    bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
    pool = None
    if conv and not depthwise and residual is None:
        j = sole_reader(out)
        if j is not None and _is_stem_pool(nodes[j]):
            pool = j
            used.append(j), sources.append(nodes[j].name)
            out = nodes[j].outputs[0]
    dw = None
    if conv and not depthwise and residual is None and pool is None:
        dw = _depthwise_after(n, w, out, nodes, consts, shapes, sole_reader, all_readers)
        if dw is not None:
            used.extend(dw["used"]), sources.extend(nodes[k].name for k in dw["used"])
            out = dw["out"]
    if dw is not None:
        fn, packed_kind, pw = _conv1x1_depthwise_fn(w, bias, act, dw, kind)
    elif conv:
        fn, packed_kind, pw = _conv_fn(n, w, bias, act, residual is not None, depthwise, kind,
                                       pool is not None)
    else:
        pw = kernels.PackedWeight.pack(w, kind=kind)
        packed_kind = pw.kind
        fn = _linear_fn(pw, bias, act, residual is not None, guarded)
    first = used[1:] if dw is None else used[1:used.index(dw["used"][0])]
    layers.append({
        "name": n.name, "op": n.op, "weight_shape": list(_const(consts, n.inputs[1]).shape),
        "packed_shape": list(w.shape[:1]) + [int(np.prod(w.shape[1:]))],
        "sparsity": float(1.0 - np.count_nonzero(w) / w.size) if w.size else 0.0,
        "kind": packed_kind, "fused": [nodes[k].op for k in first],
        # the 4x1 block kernel runs whole row groups, so each conv group must hold whole ones
        "blocks": "4x1" if pw is not None and pw.row_blocks == 4
        and (w.shape[0] // int(n.attrs.get("group", 1))) % 4 == 0 else None,
    })
    if dw is not None:
        wd, dn = dw["w"], nodes[dw["used"][0]]
        layers.append({
            "name": dn.name, "op": dn.op, "weight_shape": list(_const(consts, dn.inputs[1]).shape),
            "packed_shape": [wd.shape[0], int(np.prod(wd.shape[1:]))],
            "sparsity": float(1.0 - np.count_nonzero(wd) / wd.size) if wd.size else 0.0,
            "kind": "depthwise", "fused": [nodes[k].op for k in dw["used"][1:]] + ["(banded with the 1x1 before it)"],
        })
    inputs = [n.inputs[0]] + ([residual] if residual else []) + extra_in
    src = StepSrc(n.name if len(used) == 1 else "+".join(sources), "+".join(nodes[k].op for k in used),
                  inputs, [out], fn, native=True, sources=sources,
                  into_residual=getattr(fn, "into_residual", None))
    if not conv:
        src.linear = (pw, bias, act, residual is not None, guarded)
    return [(max(used), src, used)]


# A 1x1 conv's output at least this large per image is run in bands with the depthwise conv that
# reads it (conv1x1_depthwise): MobileNetV2's 96 x 112 x 112 and 144 x 56 x 56 expansions ran
# 1.3-1.8x faster that way with caches cold, 192 x 28 x 28 (600 KB) 0.97x (2 threads, AVX-512).
_BAND_MIN_BYTES = 1 << 20


def _depthwise_after(n: Node, w, out, nodes, consts, shapes, sole_reader, all_readers):
    """The depthwise Conv (with its BatchNormalization and activation) that is the only reader
    of a 1x1, stride-1, unpadded Conv's output ``out``, when conv1x1_depthwise should run the
    two: {"used", "out", "w", "bias", "act", "geometry"} or None."""
    a = n.attrs
    if (w.shape[2:] != (1, 1) or a.get("group", 1) != 1 or any(v != 1 for v in a.get("strides", [1, 1]))
            or any(a.get("pads", [0, 0, 0, 0])) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
        return None
    j = sole_reader(out)
    if j is None or nodes[j].op != "Conv" or nodes[j].inputs[0] != out:
        return None
    dn = nodes[j]
    got = _weight_of(dn, consts)
    m = w.shape[0]
    if got is None or got[0].shape[:2] != (m, 1) or dn.attrs.get("group", 1) != m \
            or dn.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    wd, bias = got
    shape_in, shape_out = shapes.get(out), shapes.get(dn.outputs[0])
    if not shape_in or not shape_out or len(shape_in) != 4 or len(shape_out) != 4 \
            or not all(isinstance(v, int) for v in (*shape_in[1:], *shape_out[1:])):
        return None
    da = dn.attrs
    geom = conv_geometry(None, tuple(da.get("kernel_shape") or wd.shape[2:]), da.get("strides"),
                         da.get("pads"), da.get("dilations"), da.get("auto_pad", "NOTSET"))
    if 4 * m * shape_in[2] * shape_in[3] < _BAND_MIN_BYTES \
            or not kernels.depthwise_per_plane(m, shape_out[2:], geom[1]):
        return None
    used, o, act = [j], dn.outputs[0], "none"
    k = sole_reader(o)
    if k is not None and nodes[k].op == "BatchNormalization":
        folded = _fold_bn(wd, bias, nodes[k], consts)
        if folded:
            wd, bias = folded
            used.append(k)
            o = nodes[k].outputs[0]
    k = sole_reader(o)
    if k is not None and (got_act := _act_of(nodes[k], consts)) is not None:
        act = got_act
        used.append(k)
        o = nodes[k].outputs[0]
    else:
        swish = _swish_after(o, nodes, sole_reader, all_readers)
        if swish is not None:
            act = swish[1]
            used.extend(swish[0])
            o = swish[2]
    bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
    return {"used": used, "out": o, "w": np.ascontiguousarray(wd, np.float32), "bias": bias,
            "act": act, "geometry": geom}


def _conv1x1_depthwise_fn(w, bias, act, dw, kind):
    pw = kernels.PackedWeight.pack(w.reshape(w.shape[0], -1), kind=kind)
    wd, b2, act2 = dw["w"], dw["bias"], dw["act"]
    _, s, p, d = dw["geometry"]

    def run(x):
        return kernels.conv1x1_depthwise(pw, x, bias, act, wd, s, p, d, b2, act2)
    return run, pw.kind, pw


def _is_stem_pool(n: Node) -> bool:
    """MaxPool 3x3, stride 2, pads 1 (ResNet's stem pool), the form conv2d_maxpool fuses."""
    a = n.attrs
    return (n.op == "MaxPool" and len([o for o in n.outputs if o]) == 1
            and list(a.get("kernel_shape", [])) == [3, 3] and list(a.get("strides", [1, 1])) == [2, 2]
            and list(a.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
            and list(a.get("dilations", [1, 1])) == [1, 1] and not a.get("ceil_mode", 0)
            and a.get("auto_pad", "NOTSET") == "NOTSET" and not a.get("storage_order", 0))


def _conv_fn(n: Node, w, bias, act, has_residual, depthwise, kind, pool=False):
    a = n.attrs
    auto_pad = a.get("auto_pad", "NOTSET")
    kshape = tuple(a.get("kernel_shape") or w.shape[2:])
    strides, dilations, group = a.get("strides"), a.get("dilations"), a.get("group", 1)
    static = None
    if auto_pad in ("NOTSET", "VALID"):
        static = conv_geometry(None, kshape, strides, a.get("pads"), dilations, auto_pad)

    def geometry(x):
        return static or conv_geometry(x.shape[2:], kshape, strides, a.get("pads"), dilations, auto_pad)

    if depthwise:
        wd = np.ascontiguousarray(w)

        def run(x):
            _, s, p, d = geometry(x)
            return kernels.depthwise_conv2d(wd, x, s, p, d, bias, act)
        return run, "depthwise", None

    pw = kernels.PackedWeight.pack(w.reshape(w.shape[0], -1), kind=kind)
    if static is not None and not pool:  # the arguments checked once per input shape
        conv = kernels.bind_conv2d(pw, *static, group, bias, act)
        if has_residual:
            def run(x, r):
                return conv(x, r)

            def into(x, r):  # the kernels read each residual element before writing it
                return conv(x, r, out=r)
            run.into_residual = into
        else:
            def run(x):
                return conv(x)
        return run, pw.kind, pw
    if has_residual:
        def run(x, r):
            k, s, p, d = geometry(x)
            return kernels.conv2d(pw, x, k, s, p, d, group, bias, act, r)

        def into(x, r):  # the kernels read each residual element before writing it
            k, s, p, d = geometry(x)
            return kernels.conv2d(pw, x, k, s, p, d, group, bias, act, r, out=r)
        run.into_residual = into
    elif pool:
        def run(x):
            k, s, p, d = geometry(x)
            return kernels.conv2d_maxpool(pw, x, k, s, p, d, group, bias, act)
    else:
        def run(x):
            k, s, p, d = geometry(x)
            return kernels.conv2d(pw, x, k, s, p, d, group, bias, act)
    return run, pw.kind, pw


def _linear_fn(pw, bias, act, has_residual, guarded):
    if not has_residual:
        return lambda x: kernels.linear(pw, x, bias, act)
    if not guarded:
        return lambda x, r: kernels.linear(pw, x, bias, act, residual=r)
    m = pw.shape[0]

    def run(x, r):
        if r.shape == x.shape[:-1] + (m,):
            return kernels.linear(pw, x, bias, act, residual=r)
        return _apply_act(np.add(kernels.linear(pw, x, bias), r), act)  # the Add broadcasts
    return run


def _apply_act(y, act):
    return y if act == "none" else kernels.activation(y, act, out=y)


# ---------------------------------------------------------------- QDQ activations
def _qparams(n: Node, consts):
    s = _const(consts, n.inputs[1])
    zp = _const(consts, n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
    if s is None or s.size != 1 or (len(n.inputs) > 2 and n.inputs[2] and zp is None):
        return None
    if zp is not None and zp.size != 1:
        return None
    return float(s.reshape(())), zp


def _fuse_qdq(i, n, nodes, consts, readers, graph_outs):
    q = _qparams(n, consts)
    qout = n.outputs[0]
    if q is None or qout in graph_outs or not readers.get(qout):
        return None
    scale, zp = q
    dtype = np.dtype(np.uint8) if zp is None else zp.dtype
    if dtype.kind not in "iu":
        return None
    zero = 0.0 if zp is None else float(zp.reshape(()))
    info = np.iinfo(dtype)
    steps = []
    for j in readers[qout]:
        dq = nodes[j]
        p = _qparams(dq, consts) if dq.op == "DequantizeLinear" and dq.inputs[0] == qout else None
        if p is None or p[0] != scale or (0.0 if p[1] is None else float(p[1].reshape(()))) != zero:
            return None
        if (np.dtype(np.uint8) if p[1] is None else p[1].dtype) != dtype:
            return None
        steps.append((j, dq))
    s32, z32 = np.float32(scale), np.float32(zero)
    lo, hi = float(info.min), float(info.max)

    def run(x):
        return fake_quantize(x, s32, z32, lo, hi)
    return [(j, StepSrc(f"{n.name}+{dq.name}", "QuantizeLinear+DequantizeLinear", [n.inputs[0]],
                        [dq.outputs[0]], run, sources=[n.name, dq.name]), [i, j]) for j, dq in steps]
