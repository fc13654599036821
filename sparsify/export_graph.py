"""ONNX graph rewrites for export: parameter names, FP16, sparse storage, metadata, fallbacks.

Pure functions on ``onnx.ModelProto`` (no torch): ``sparsify.export`` calls them between
torch's exporter and the checks.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsify.export_checks import WEIGHT_OPS

META_PREFIX = "sparsify."


# ---------------------------------------------------------------------------------------------
# cleaning up torch's export


def clean(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (fx node text, stack scopes)."""
    graph = proto.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        del vi.metadata_props[:]
    for init in graph.initializer:
        del init.metadata_props[:]
    del proto.metadata_props[:]
    proto.doc_string = "exported by sparsify"


def restore_names(proto: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """Rename initializers that the exporter's optimizer renamed back to parameter names.

    Linear weights feeding MatMul come out pre-transposed as ``val_N``; identical tensors are
    stored once. Each unnamed initializer that equals a parameter (or its transpose) gets the
    parameter's name. Returns parameter name -> initializer name for every parameter found.
    """
    graph = proto.graph
    index: dict[tuple, list[str]] = {}
    for name, a in tensors.items():
        for arr in (a, a.T) if a.ndim == 2 else (a,):
            arr = np.ascontiguousarray(arr)
            index.setdefault((arr.dtype.str, arr.shape, hash(arr.tobytes())), []).append(name)
    taken = {t.name for t in graph.initializer}
    found = {name: name for name in tensors if name in taken}
    renames = {}
    for init in graph.initializer:
        arr = np.ascontiguousarray(numpy_helper.to_array(init))
        names = index.get((arr.dtype.str, arr.shape, hash(arr.tobytes())), [])
        for name in names:
            if name not in found:
                found[name] = init.name
        if init.name in tensors:
            continue
        free = [n for n in names if n not in taken]
        if free:
            renames[init.name] = free[0]
            taken.add(free[0])
    for init in graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return {p: renames.get(i, i) for p, i in found.items()}


# ---------------------------------------------------------------------------------------------
# FP16: float16 initializers and compute, float32 inputs/outputs, some ops kept FP32


def to_fp16(proto: onnx.ModelProto, keep_fp32: Iterable[str]) -> onnx.ModelProto:
    """A float16 copy of an FP32 graph.

    Float initializers and constants become float16 (a nonzero that would underflow to 0 is
    kept at the smallest float16 subnormal, so the zero pattern is exactly the FP32 one). Graph
    inputs and outputs stay float32 with a Cast at the boundary, so the FP16 file takes the
    same feeds as the FP32 file. Nodes whose op type is in ``keep_fp32`` (normalizations,
    softmax, reductions) run in FP32 between Casts, with FP32 parameters.
    """
    keep_fp32 = set(keep_fp32)
    model = copy.deepcopy(proto)
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.input,
                        *inferred.graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    fp32_inits = {t.name for t in graph.initializer if t.data_type == F32
                  and consumers.get(t.name) and consumers[t.name] <= keep_fp32}
    for t in graph.initializer:
        if t.data_type == F32 and t.name not in fp32_inits:
            t.CopyFrom(half_tensor(t))

    nodes = []
    renamed: dict[str, str] = {}  # tensor name -> the name its FP16 value now carries
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == F32:
            renamed[inp.name] = inp.name + "/fp16"
            nodes.append(helper.make_node("Cast", [inp.name], [renamed[inp.name]], to=F16,
                                          name=inp.name + "/cast_fp16"))
    outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == F32}
    tail = []
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == F32:
                    attr.t.CopyFrom(half_tensor(attr.t))
        elif node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == F32:
                    attr.i = F16
        fp32_node = node.op_type in keep_fp32
        pre, post = [], []
        for i, name in enumerate(list(node.input)):
            node.input[i] = renamed.get(name, name)
            if fp32_node and name and types.get(name) == F32 and name not in fp32_inits:
                up = f"{name}/fp32/{node.name or node.op_type}/{i}"
                pre.append(helper.make_node("Cast", [node.input[i]], [up], to=F32, name=up))
                node.input[i] = up
        for i, name in enumerate(list(node.output)):
            if not name or types.get(name) != F32:
                continue
            half = name
            if name in outputs:
                half = renamed[name] = name + "/fp16"
                tail.append(helper.make_node("Cast", [half], [name], to=F32,
                                             name=name + "/cast_fp32"))
            if fp32_node:
                node.output[i] = name + "/fp32"
                post.append(helper.make_node("Cast", [name + "/fp32"], [half], to=F16,
                                             name=name + "/cast_fp16"))
            else:
                node.output[i] = half
        nodes += pre + [node] + post
    nodes.extend(tail)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return model


def half_tensor(t: TensorProto) -> TensorProto:
    a = numpy_helper.to_array(t)
    h = a.astype(np.float16)
    tiny = np.float16(2.0 ** -24)  # smallest float16 subnormal
    lost = (h == 0) & (a != 0)
    if lost.any():
        h[lost] = np.where(a[lost] > 0, tiny, -tiny)
    return numpy_helper.from_array(h, t.name)


# ---------------------------------------------------------------------------------------------
# compressed sparse storage and metadata


def compress_weights(proto: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """Move the weights ``names`` into ``graph.sparse_initializer`` where that is smaller.

    A sparse initializer is a standard ONNX COO tensor: the nonzero values plus their int64
    linear indices, so it costs (itemsize + 8) bytes per nonzero against itemsize per element
    dense: it pays off above 67% sparsity for FP32 and above 89% for INT8. Runtimes (onnxruntime
    included) densify it at load. Returns the names moved.
    """
    graph = proto.graph
    names = set(names)
    keep, moved = [], []
    for t in graph.initializer:
        a = numpy_helper.to_array(t) if t.name in names else None
        if a is None or a.size == 0:
            keep.append(t)
            continue
        flat = a.reshape(-1)
        idx = np.flatnonzero(flat).astype(np.int64)
        if idx.size * (a.itemsize + 8) >= a.size * a.itemsize:
            keep.append(t)
            continue
        values = numpy_helper.from_array(flat[idx], t.name)
        indices = numpy_helper.from_array(idx, t.name + "/indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(a.shape)))
        moved.append(t.name)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return moved


def set_metadata(proto: onnx.ModelProto, entries: dict[str, Any]) -> None:
    for key, value in entries.items():
        if value is None:
            continue
        prop = proto.metadata_props.add()
        prop.key = META_PREFIX + key
        prop.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``sparsify.*`` metadata of an exported file, JSON values decoded."""
    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for prop in proto.metadata_props:
        if prop.key.startswith(META_PREFIX):
            key = prop.key[len(META_PREFIX):]
            try:
                out[key] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[key] = prop.value
    return out


def int8_fallbacks(qstate: dict, proto: onnx.ModelProto) -> list[str]:
    """Layers left FP32: those the quantizer skipped, and weights in the graph without a DQ."""
    out = [f"{f['name']} ({f['type']}): {f['reason']}" for f in qstate.get("fallback", [])]
    out += [f"{name}: ignored by the recipe" for name in qstate.get("ignored", [])]
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        idx = WEIGHT_OPS.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name = node.input[idx]
        if name in inits and producers.get(name) != "DequantizeLinear":
            if not any(name.startswith(f.split(" ")[0].rstrip(":") + ".") for f in out):
                out.append(f"{name}: {node.op_type} weight left FP32 in the INT8 graph")
    return out
