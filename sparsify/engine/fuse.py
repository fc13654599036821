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
values onnxruntime's QDQ arithmetic produces).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

import numpy as np

from sparsify.engine import kernels, ops
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
    producer = {o: k for k, nd in enumerate(nodes) for o in nd.outputs if o}
    for i, n in enumerate(nodes):
        if n.op == "MatMul" and i not in absorbed:
            got = _fuse_attention(i, n, nodes, consts, shapes, producer, readers, graph_outs,
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
        if fused:
            for pos, src, used in fused:
                absorbed.update(used)
                placed.append((pos, src))
            continue
        fn = bind(n.op, n.attrs, len(n.inputs), len(n.outputs), n.opset)
        src = StepSrc(n.name, n.op, n.inputs, n.outputs, fn,
                      multi=n.op in MULTI_OUTPUT and len(n.outputs) > 1,
                      native=ops.runs_native(n.op, n.attrs, n.opset), sources=[n.name])
        src.norm = _row_norm(n, consts)
        placed.append((i, src))
    placed.sort(key=lambda p: p[0])  # stable: a fused step lands where its last node stood
    steps = chain_linears(attention_blocks([s for _, s in placed], graph_outs), graph_outs)
    feature_major_streams(steps, graph_outs)
    reuse_buffers(steps, shapes, graph_outs)
    return steps, layers


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


# ---------------------------------------------------------------- attention
def _fuse_attention(i, n, nodes, consts, shapes, producer, readers, graph_outs, sole_reader):
    """The exported self-attention block around MatMul node i, as one kernels.attention step:

        Q = Transpose(Reshape(q, [B, S, H, D]), [0, 2, 1, 3])      (K: perm [0, 2, 3, 1], V as Q)
        Transpose(Softmax(Q @ K [* or / scalar] [+ mask]) @ V, [0, 2, 1, 3]) -> Reshape [B, S, H*D]

    q, k, v are the projections' [B, S, H*D] outputs; the kernel reads heads from them in place.
    The Shape/Gather/Unsqueeze/Concat nodes that only compute the reshapes' targets go with it.
    Returns [(position, StepSrc, absorbed node indices)] or None.
    """
    if len(n.inputs) != 2 or any(x in consts for x in n.inputs):
        return None

    def only_reader(value, j):
        return value not in graph_outs and readers.get(value) == [j]

    def head_split(value, perm, reader):
        """(x, H, D, node indices) when value = Transpose(Reshape(x, [B, S, H, D]), perm)."""
        t = producer.get(value)
        if t is None or nodes[t].op != "Transpose" or not only_reader(value, reader) \
                or list(nodes[t].attrs.get("perm", ())) != list(perm):
            return None
        r = producer.get(nodes[t].inputs[0])
        if r is None or nodes[r].op != "Reshape" or not only_reader(nodes[t].inputs[0], t) \
                or nodes[r].attrs.get("allowzero", 0):
            return None
        x = nodes[r].inputs[0]
        xs, target = shapes.get(x), _shape_value(nodes[r].inputs[1], consts, shapes, nodes, producer)
        if not xs or len(xs) != 3 or not isinstance(xs[2], int) or not target or len(target) != 4:
            return None
        if any(t_ not in (0, x_) for t_, x_ in zip(target[:2], xs[:2])) or None in xs[:2]:
            return None
        h, d = target[2:]
        if h == -1 and isinstance(d, int) and d > 0 and xs[2] % d == 0:
            h = xs[2] // d
        if d == -1 and isinstance(h, int) and h > 0 and xs[2] % h == 0:
            d = xs[2] // h
        if not (isinstance(h, int) and isinstance(d, int) and h > 0 and d > 0 and h * d == xs[2]):
            return None
        return x, h, d, [t, r]

    q = head_split(n.inputs[0], (0, 2, 1, 3), i)
    k = head_split(n.inputs[1], (0, 2, 3, 1), i)
    if q is None or k is None or q[1:3] != k[1:3]:
        return None
    heads, hd = q[1], q[1] * q[2]
    used = [i] + q[3] + k[3]
    out, scale, mask = n.outputs[0], 1.0, None
    j = sole_reader(out)
    if j is not None and nodes[j].op in ("Mul", "Div"):
        c = _scalar(consts, _other(nodes[j], out))
        if c is not None and (nodes[j].op == "Mul" or nodes[j].inputs[0] == out) and c != 0:
            scale = c if nodes[j].op == "Mul" else 1.0 / c
            used.append(j)
            out = nodes[j].outputs[0]
            j = sole_reader(out)
    if j is not None and nodes[j].op == "Add":
        mask = _other(nodes[j], out)
        used.append(j)
        out = nodes[j].outputs[0]
        j = sole_reader(out)
    if j is None or nodes[j].op != "Softmax" or nodes[j].opset < 13 \
            or nodes[j].attrs.get("axis", -1) not in (-1, 3):
        return None
    used.append(j)
    out = nodes[j].outputs[0]
    j = sole_reader(out)
    if j is None or nodes[j].op != "MatMul" or nodes[j].inputs[0] != out:
        return None
    v = head_split(nodes[j].inputs[1], (0, 2, 1, 3), j)
    if v is None or v[1:3] != q[1:3]:
        return None
    used += [j] + v[3]
    out = nodes[j].outputs[0]
    t = sole_reader(out)
    if t is None or nodes[t].op != "Transpose" or list(nodes[t].attrs.get("perm", ())) != [0, 2, 1, 3]:
        return None
    r = sole_reader(nodes[t].outputs[0])
    if r is None or nodes[r].op != "Reshape" or nodes[r].attrs.get("allowzero", 0):
        return None
    target = _shape_value(nodes[r].inputs[1], consts, shapes, nodes, producer)
    qs = shapes.get(q[0])
    if not target or len(target) != 3 or target[2] not in (hd, -1) \
            or any(t_ not in (0, x_) for t_, x_ in zip(target[:2], qs[:2])):
        return None
    used += [t, r]
    used += _dead_shape_nodes(used, nodes, producer, readers, graph_outs)
    names = [nodes[u].name for u in sorted(used)]

    def run(q, k, v, m=None):
        return kernels.attention(q, k, v, heads, scale, m)
    src = StepSrc(f"{n.name} (attention, {len(used)} nodes)", "Attention",
                  [q[0], k[0], v[0]] + ([mask] if mask else []), [nodes[r].outputs[0]], run,
                  native=True, sources=names)
    src.attention = (heads, scale)
    return max(used), src, used


def _shape_value(name, consts, shapes, nodes, producer):
    """A 1-D shape tensor's entries (int, or a symbolic dim's name) when shape inference and
    constants determine them, else None: follows Concat / Unsqueeze / Gather / Shape."""
    if name in consts:
        c = consts[name]
        return tuple(int(x) for x in c.ravel()) if c.dtype.kind == "i" and c.ndim <= 1 else None
    p = producer.get(name)
    if p is None:
        return None
    nd = nodes[p]
    if nd.op == "Shape":
        dims = shapes.get(nd.inputs[0])
        if dims is None:
            return None
        dims = dims[nd.attrs.get("start", 0):nd.attrs.get("end")]
        return None if None in dims else tuple(dims)
    if nd.op == "Unsqueeze":
        got = _shape_value(nd.inputs[0], consts, shapes, nodes, producer)
        return got if got is not None and len(got) == 1 else None
    if nd.op == "Gather" and nd.attrs.get("axis", 0) == 0:
        data = _shape_value(nd.inputs[0], consts, shapes, nodes, producer)
        idx = consts.get(nd.inputs[1])
        if data is None or idx is None or idx.size != 1 or idx.dtype.kind != "i":
            return None
        k = int(idx.reshape(()))
        return (data[k],) if -len(data) <= k < len(data) else None
    if nd.op == "Concat" and nd.attrs.get("axis") in (0, -1):
        parts = [_shape_value(x, consts, shapes, nodes, producer) for x in nd.inputs]
        return None if any(p_ is None for p_ in parts) else tuple(d for p_ in parts for d in p_)
    return None


def _dead_shape_nodes(used, nodes, producer, readers, graph_outs):
    """The nodes that compute the absorbed Reshapes' targets and feed nothing else."""
    gone = set(used)
    todo = [producer.get(nodes[u].inputs[1]) for u in used if nodes[u].op == "Reshape"]
    while todo:
        p = todo.pop()
        if p is None or p in gone:
            continue
        outs = [o for o in nodes[p].outputs if o]
        if any(o in graph_outs or any(r not in gone for r in readers.get(o, [])) for o in outs):
            continue
        gone.add(p)
        todo += [producer.get(x) for x in nodes[p].inputs]
    return sorted(gone - set(used))


# ---------------------------------------------------------------- attention sublayers
def attention_blocks(steps: list, graph_outs: set) -> list:
    """An attention step whose Q, K, V come from linear steps on one input (no activation, read
    by nothing else) and whose output only a linear step reads (the output projection) becomes
    one ``kernels.attention_block`` step where the output projection stood: the input is then
    transposed once and only the result is transposed back."""
    readers: dict[str, list[int]] = {}
    producer = {}
    for k, s in enumerate(steps):
        for x in s.inputs:
            readers.setdefault(x, []).append(k)
        for o in s.outputs:
            producer[o] = k
    out = list(steps)

    def only_reader(value, k):
        return value not in graph_outs and readers.get(value) == [k]

    for k, a in enumerate(steps):
        if a.attention is None or len(set(a.inputs[:3])) != 3:
            continue
        proj = [producer.get(x) for x in a.inputs[:3]]
        if any(p is None or out[p] is None or out[p].linear is None or out[p].linear[2] != "none"
               or out[p].linear[3] or not only_reader(out[p].outputs[0], k) for p in proj):
            continue
        if len({out[p].inputs[0] for p in proj}) != 1:
            continue
        r = readers.get(a.outputs[0], [])
        if len(r) != 1 or a.outputs[0] in graph_outs:
            continue
        o = out[r[0]]
        if o is None or o.linear is None or o.inputs[0] != a.outputs[0] \
                or a.outputs[0] in o.inputs[1:]:
            continue
        qkv = _stacked(*(out[p].linear for p in proj))
        x = out[proj[0]].inputs[0]
        parts = [out[p] for p in proj] + [a, o]
        norm = _norm_before(x, producer, out, proj, graph_outs)
        if norm is not None:
            parts.insert(0, out[producer[x]])
            out[producer[x]] = None
            x = parts[0].inputs[0]
        make = functools.partial(_block_fn, qkv, o.linear, a.attention, len(a.inputs) > 3,
                                 norm and norm.norm)
        out[r[0]] = StepSrc(f"{a.name}+projections", ("LayerNormalization+" if norm else "")
                            + "AttentionBlock", [x] + a.inputs[3:] + o.inputs[1:], o.outputs,
                            make(), native=True, sources=[n for p in parts for n in p.sources],
                            block=(make, o.linear[3]))
        for p in proj + [k]:
            out[p] = None
    return [s for s in out if s is not None]


def _norm_before(x, producer, steps, readers_of_x, graph_outs):
    """The LayerNormalization step that makes x when only the steps at readers_of_x read it."""
    p = producer.get(x)
    if p is None or steps[p] is None or steps[p].norm is None or x in graph_outs:
        return None
    return steps[p] if sorted(readers_of_x) == sorted(_readers(x, steps)) else None


def _readers(value, steps):
    return [k for k, s in enumerate(steps) if s is not None and value in s.inputs]


def _stacked(*linears):
    """One packed weight and bias for linear layers on the same input, outputs side by side
    (the Q, K, V projections: one GEMM packs the input once and splits once over threads)."""
    pws = [lin[0] for lin in linears]
    w = np.concatenate([pw.to_dense() for pw in pws])
    kind = pws[0].kind if len({pw.kind for pw in pws}) == 1 else "auto"
    biases = [lin[1] if lin[1] is not None else np.zeros(pw.shape[0], np.float32)
              for lin, pw in zip(linears, pws)]
    bias = None if all(lin[1] is None for lin in linears) else np.concatenate(biases)
    return kernels.PackedWeight.pack(w, kind=kind), bias


def _block_fn(qkv, o, attention, has_mask, ln, fm=(False, False, False)):
    pw, bias, act, has_residual, guarded = o
    heads, scale = attention
    m = pw.shape[0]

    def run(x, *rest):
        mask = rest[0] if has_mask else None
        res = rest[-1] if has_residual else None
        if guarded:
            lead = x.shape[1:] if fm[0] else x.shape[:-1]
            if res.shape != ((m,) + lead if fm[1] else lead + (m,)):  # the Add broadcasts
                y = kernels.attention_block(x, qkv, (pw, bias), heads, scale, mask, ln=ln,
                                            fm=(fm[0], False, False))
                y = _apply_act(np.add(y, np.moveaxis(res, 0, -1) if fm[1] else res), act)
                return np.ascontiguousarray(np.moveaxis(y, -1, 0)) if fm[2] else y
        return kernels.attention_block(x, qkv, (pw, bias), heads, scale, mask, act, residual=res,
                                       ln=ln, fm=fm)
    return run


def _row_norm(n: Node, consts: dict):
    """(scale, bias, epsilon) of a LayerNormalization over the last axis with constant float32
    parameters whose only output is read, else None."""
    if n.op != "LayerNormalization" or len(n.outputs) != 1 or n.attrs.get("axis", -1) != -1:
        return None
    scale = _const(consts, n.inputs[1])
    bias = _const(consts, n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
    if scale is None or scale.dtype != np.float32 or scale.ndim != 1 \
            or (len(n.inputs) > 2 and n.inputs[2] and (bias is None or bias.shape != scale.shape
                                                        or bias.dtype != np.float32)):
        return None
    return scale, bias, float(n.attrs.get("epsilon", 1e-5))


# ---------------------------------------------------------------- linear chains
def chain_linears(steps: list, graph_outs: set) -> list:
    """A linear step whose output only the next linear layer reads (a transformer's fc1 -> fc2)
    joins it in one ``kernels.linear_chain`` step: the hidden activation then never leaves the
    core, which keeps it in the layout the second layer reads (two whole-matrix transposes
    fewer). The joint step runs where the second one stood."""
    readers: dict[str, list[int]] = {}
    producer = {}
    for k, s in enumerate(steps):
        for x in s.inputs:
            readers.setdefault(x, []).append(k)
        for o in s.outputs:
            producer[o] = k
    out = list(steps)
    for k, a in enumerate(steps):
        if a.linear is None or a.linear[3]:
            continue
        hidden = a.outputs[0]
        r = readers.get(hidden, [])
        if hidden in graph_outs or len(r) != 1:
            continue
        b = out[r[0]]
        if b.linear is None or b.linear[4] or b.inputs[0] != hidden or hidden in b.inputs[1:]:
            continue
        x, parts, op = a.inputs[0], [a, b], f"{a.op}>{b.op}"
        norm = _norm_before(x, producer, out, [k], graph_outs)
        if norm is not None:
            out[producer[x]] = None
            x, parts, op = norm.inputs[0], [norm] + parts, "LayerNormalization>" + op
        out[k] = None
        make = functools.partial(_chain_fn, a.linear, b.linear, norm and norm.norm)
        out[r[0]] = StepSrc(f"{a.name}>{b.name}", op, [x] + b.inputs[1:], b.outputs, make(),
                            native=True, sources=[n for p in parts for n in p.sources],
                            block=(make, b.linear[3]))
    return [s for s in out if s is not None]


def _chain_fn(first, second, ln, fm=(False, False, False)):
    pw1, bias1, act1 = first[:3]
    pw2, bias2, act2, has_residual = second[:4]
    if has_residual:
        return lambda x, r: kernels.linear_chain(pw1, pw2, x, bias1, act1, bias2, act2,
                                                 residual=r, ln=ln, fm=fm)
    return lambda x: kernels.linear_chain(pw1, pw2, x, bias1, act1, bias2, act2, ln=ln, fm=fm)


# ---------------------------------------------------------------- feature-major residual stream
def feature_major_streams(steps: list, graph_outs: set) -> None:
    """Keep values that only pass between blocks (attention and feed-forward steps, as input or
    residual) feature-major: a transformer's residual stream then crosses from layer to layer
    without a transpose at either end. Rewrites the blocks' functions in place."""
    readers: dict[str, list[int]] = {}
    for k, s in enumerate(steps):
        for x in s.inputs:
            readers.setdefault(x, []).append(k)

    def stream_slots(s):
        return (0, len(s.inputs) - 1) if s.block[1] else (0,)

    fm_values = set()
    for s in steps:
        v = s.outputs[0]
        if s.block is None or v in graph_outs or not readers.get(v):
            continue
        if all(steps[k].block is not None and all(i in stream_slots(steps[k])
                                                  for i, x in enumerate(steps[k].inputs) if x == v)
               for k in readers[v]):
            fm_values.add(v)
    for s in steps:
        if s.block is None:
            continue
        fm = (s.inputs[0] in fm_values, s.block[1] and s.inputs[-1] in fm_values,
              s.outputs[0] in fm_values)
        if any(fm):
            s.fn = s.block[0](fm=fm)


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


def _fold_bn(w, b, bn: Node, consts):
    """Conv weight/bias with the following inference BatchNormalization folded in, or None."""
    vals = [_const(consts, x) for x in bn.inputs[1:5]]
    if any(v is None for v in vals) or bn.attrs.get("training_mode", 0) or any(bn.outputs[1:]):
        return None
    scale, beta, mean, var = (v.astype(np.float64) for v in vals)
    s = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    w = (w.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(np.float32)
    return w, ((b0 - mean) * s + beta).astype(np.float32)


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
    bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
    if conv:
        fn, packed_kind, pw = _conv_fn(n, w, bias, act, residual is not None, depthwise, kind)
    else:
        pw = kernels.PackedWeight.pack(w, kind=kind)
        packed_kind = pw.kind
        fn = _linear_fn(pw, bias, act, residual is not None, guarded)
    layers.append({
        "name": n.name, "op": n.op, "weight_shape": list(_const(consts, n.inputs[1]).shape),
        "packed_shape": list(w.shape[:1]) + [int(np.prod(w.shape[1:]))],
        "sparsity": float(1.0 - np.count_nonzero(w) / w.size) if w.size else 0.0,
        "kind": packed_kind, "fused": [nodes[k].op for k in used[1:]],
    })
    inputs = [n.inputs[0]] + ([residual] if residual else []) + extra_in
    src = StepSrc(n.name if len(used) == 1 else "+".join(sources), "+".join(nodes[k].op for k in used),
                  inputs, [out], fn, native=True, sources=sources)
    if not conv:
        src.linear = (pw, bias, act, residual is not None, guarded)
    return [(max(used), src, used)]


def _conv_fn(n: Node, w, bias, act, has_residual, depthwise, kind):
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
    if has_residual:
        def run(x, r):
            k, s, p, d = geometry(x)
            return kernels.conv2d(pw, x, k, s, p, d, group, bias, act, r)
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
    if act == "relu":
        return np.maximum(y, 0, out=y)
    if act == "gelu":
        return ops.OPS["Gelu"](y)
    if act != "none":
        return np.clip(y, act[1], act[2], out=y)
    return y


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
