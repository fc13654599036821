"""Transformer fusions over the steps fuse.py builds (see its docstring for the general ones).

- fuse_attention: the exported self-attention block (head split by Reshape + Transpose, scaled
  Q.K^T, mask, Softmax, .V, heads merged back) becomes one ``kernels.attention`` step; the
  Shape/Gather/Unsqueeze/Concat nodes that only compute the reshape targets go with it.
- attention_blocks: that step with its Q/K/V projections (stacked into one weight) and the
  output projection becomes one ``kernels.attention_block`` step;
- chain_linears: a linear layer whose output only the next linear layer reads (fc1 -> fc2)
  becomes one ``kernels.linear_chain`` step;
- both take the LayerNormalization in front of them along (row_norm marks the candidates);
- feature_major_streams: values passed only between such blocks stay feature-major.

All of this keeps activations inside the core in the layout its GEMMs read, so a BERT layer
transposes nothing between its first and last GEMM.
"""

from __future__ import annotations

import functools

import numpy as np

from sparsify.engine import kernels
from sparsify.engine.fuse import Node, StepSrc, _apply_act, _const, _other, _scalar


# ---------------------------------------------------------------- attention
def fuse_attention(i, n, nodes, consts, shapes, producer, readers, graph_outs, sole_reader):
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


def row_norm(n: Node, consts: dict):
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
