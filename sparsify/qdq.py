"""Rewrite an FP32 ONNX graph into INT8 QDQ form using the scales recorded in torch.

Input: the ONNX export of ``sparsify.quant.strip_fake_quant(model)`` and
``sparsify.quant.quantization_state(model)`` (taken before stripping). For every Conv / Gemm /
MatMul whose weight initializer belongs to a quantized torch layer:

* the FP32 weight becomes an int8 initializer (symmetric, zero-point 0, one scale per output
  channel) read through DequantizeLinear; the stripped weights already lie on that grid, so the
  integers are recovered exactly and every zero stays a zero;
* the activation input gets QuantizeLinear -> DequantizeLinear (uint8, per tensor), and so does a
  unit output recorded with its own observer (after a following Relu/Clip when the observer saw
  the activated values), which lets onnxruntime fuse the conv into QLinearConv;
* a Conv/Gemm bias becomes int32 with scale input_scale * weight_scale[c] (onnxruntime only fuses
  a node whose every input comes from DequantizeLinear); a MatMul's separate Add bias stays FP32.

Initializers are matched to layers by name (``layer1.0.conv1.weight``, as both torch exporters
keep it for Conv/Gemm), and otherwise by value: the SHA-1 of the stripped weight or of its
transpose (the exporters rename and transpose MatMul weights, e.g. ``val_21``).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsify.errors import ExportError

log = logging.getLogger(__name__)

_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
_ACT_FOLLOWERS = {"relu": ("Relu",), "relu6": ("Clip",)}


def _clean(name: str) -> str:
    """A readable initializer/node name prefix from a tensor name ('/a/Conv_output_0', 'x:0')."""
    return name.replace(":", "_").replace("/", "_").strip("_")


def _sha1(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, qstate: dict):
        self.model = model
        self.g = model.graph
        self.layers = qstate.get("layers", {})
        self.inits = {t.name: t for t in self.g.initializer}
        self.by_name = {e["weight"]: n for n, e in self.layers.items()}
        # several layers may hold identical weights (e.g. all pruned): keep every candidate
        self.by_hash: dict[str, list[tuple[str, bool]]] = {}
        for n, e in self.layers.items():
            self.by_hash.setdefault(e["weight_sha1"], []).append((n, False))
            if e.get("weight_t_sha1"):
                self.by_hash.setdefault(e["weight_t_sha1"], []).append((n, True))
        self.new_nodes: list[tuple[int, onnx.NodeProto]] = []  # (insert before index, node)
        self.quantized_tensors: dict[str, str] = {}  # fp32 tensor -> its DQ output
        self.done_weights: dict[str, str] = {}
        self.matched: dict[str, str] = {}  # layer -> node name

    # -- helpers -----------------------------------------------------------------------------
    def _add_init(self, name: str, arr: np.ndarray) -> str:
        self.g.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def _producer_index(self) -> dict[str, int]:
        return {o: i for i, n in enumerate(self.g.node) for o in n.output}

    def _consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if tensor in n.input]

    def _find_layer(self, init_name: str, arr: np.ndarray) -> tuple[str, bool] | None:
        hits = self.by_hash.get(_sha1(arr), [])
        name = self.by_name.get(init_name)
        for hit in hits:
            if hit[0] == name:
                return hit
        for hit in hits:
            if hit[0] not in self.matched:
                return hit
        if hits:
            return hits[0]
        if name is not None:
            raise ExportError(
                f"initializer {init_name} is named like quantized layer {name} but its values "
                f"differ from the stripped model's: export sparsify.quant.strip_fake_quant(model), "
                f"not the QAT model, and take quantization_state from the same model")
        return None

    # -- weights -----------------------------------------------------------------------------
    def quantize_weight(self, node: onnx.NodeProto, idx: int, layer: str, transposed: bool,
                        arr: np.ndarray) -> np.ndarray:
        e = self.layers[layer]
        scale = np.asarray(e["weight_scale"], dtype=np.float32)
        axis = 1 if transposed else 0
        shape = [1] * arr.ndim
        shape[axis] = -1
        q = np.round(arr / scale.reshape(shape))
        if np.abs(q * scale.reshape(shape) - arr).max(initial=0.0) > 1e-5 * max(
                float(np.abs(arr).max(initial=0.0)), 1e-12):
            raise ExportError(f"weight of {layer} (initializer {node.input[idx]}) is not on its "
                              f"int8 grid; export the model returned by strip_fake_quant")
        if np.abs(q).max(initial=0) > 127:
            raise ExportError(f"weight of {layer} exceeds the int8 range [-127, 127]")
        src = node.input[idx]
        if src not in self.done_weights:
            base = _clean(src)
            qi = self._add_init(f"{base}_quantized", q.astype(np.int8))
            si = self._add_init(f"{base}_scale", scale)
            zi = self._add_init(f"{base}_zero_point", np.zeros(len(scale), dtype=np.int8))
            out = f"{base}_dequantized"
            self.new_nodes.append((0, helper.make_node(
                "DequantizeLinear", [qi, si, zi], [out], name=f"{base}_DequantizeLinear",
                axis=axis)))
            self.done_weights[src] = out
        node.input[idx] = self.done_weights[src]
        return scale

    def quantize_bias(self, node: onnx.NodeProto, layer: str, w_scale: np.ndarray) -> None:
        if len(node.input) < 3 or node.input[2] not in self.inits:
            return
        e = self.layers[layer]
        b = numpy_helper.to_array(self.inits[node.input[2]]).astype(np.float64)
        if b.ndim != 1 or b.shape[0] != len(w_scale):
            return
        bscale = (np.float64(e["input_scale"]) * w_scale.astype(np.float64)).astype(np.float32)
        qb = np.clip(np.round(b / bscale), -(2**31), 2**31 - 1).astype(np.int32)
        base = _clean(node.input[2])
        if any(t.name == f"{base}_quantized" for t in self.g.initializer):
            base = _clean(f"{node.input[2]}_{layer}")  # a bias shared by two nodes
        qi = self._add_init(f"{base}_quantized", qb)
        si = self._add_init(f"{base}_scale", bscale)
        zi = self._add_init(f"{base}_zero_point", np.zeros(len(bscale), dtype=np.int32))
        out = f"{base}_dequantized"
        self.new_nodes.append((0, helper.make_node(
            "DequantizeLinear", [qi, si, zi], [out], name=f"{base}_DequantizeLinear", axis=0)))
        node.input[2] = out

    # -- activations -------------------------------------------------------------------------
    def quantize_tensor(self, tensor: str, scale: float, zp: int,
                        only: onnx.NodeProto | None = None) -> None:
        """Q->DQ on ``tensor``; every consumer (or ``only`` that one) reads the dequantized copy.

        Graph outputs stay FP32. ``only`` is used where torch fake-quantized the tensor for the
        quantized layer alone (no module to hook upstream), so ONNX computes what torch did.
        """
        if tensor in self.quantized_tensors or tensor in self.inits:
            if only is not None and tensor in self.quantized_tensors:
                self._rewire([only], tensor, self.quantized_tensors[tensor])
            return
        base = _clean(tensor)
        si = self._add_init(f"{base}_act_scale", np.array(scale, dtype=np.float32))
        zi = self._add_init(f"{base}_act_zero_point", np.array(zp, dtype=np.uint8))
        q_out, dq_out = f"{base}_quantized", f"{base}_dequantized"
        self._rewire([only] if only is not None else self._consumers(tensor), tensor, dq_out)
        self.new_nodes.append((1, helper.make_node(
            "QuantizeLinear", [tensor, si, zi], [q_out], name=f"{base}_QuantizeLinear")))
        self.new_nodes.append((1, helper.make_node(
            "DequantizeLinear", [q_out, si, zi], [dq_out], name=f"{base}_DequantizeLinear")))
        self.quantized_tensors[tensor] = dq_out

    @staticmethod
    def _rewire(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
        for n in nodes:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new

    def output_tensor(self, node: onnx.NodeProto, act: str | None) -> str | None:
        out = node.output[0]
        if act is None:
            return out
        users = self._consumers(out)
        if len(users) == 1 and users[0].op_type in _ACT_FOLLOWERS[act]:
            return users[0].output[0]
        log.info("node %s: expected a %s after it; its output stays FP32", node.name, act)
        return None

    # -- main --------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        plan = []
        for node in list(self.g.node):
            if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
                continue
            idx = 1
            if node.op_type == "Gemm":
                if any(a.name == "transA" and a.i for a in node.attribute):
                    continue
            src = node.input[idx]
            if src not in self.inits:
                continue  # MatMul between activations (attention) stays FP32
            arr = numpy_helper.to_array(self.inits[src])
            if arr.dtype != np.float32:
                continue
            hit = self._find_layer(src, arr)
            if hit is None:
                continue
            layer, transposed = hit
            self.matched[layer] = node.name
            if node.op_type == "Gemm":
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                transposed = not trans_b
            elif node.op_type == "MatMul":
                transposed = True
            plan.append((node, layer, transposed, arr))
        graph_outputs = {o.name for o in self.g.output}
        for node, layer, transposed, arr in plan:
            e = self.layers[layer]
            w_scale = self.quantize_weight(node, 1, layer, transposed, arr)
            if node.op_type in ("Conv", "Gemm"):
                self.quantize_bias(node, layer, w_scale)
            x = node.input[0]
            if x not in self.quantized_tensors.values():
                only = None if e.get("input_all_consumers", True) else node
                self.quantize_tensor(x, e["input_scale"], e["input_zero_point"], only)
            self.matched[layer] = node.name
        for node, layer, _, _ in plan:
            e = self.layers[layer]
            if e.get("output_scale") is None:
                continue
            out = self.output_tensor(node, e.get("output_act"))
            if out is not None and out not in graph_outputs:
                self.quantize_tensor(out, e["output_scale"], e["output_zero_point"])
        missing = sorted(set(self.layers) - set(self.matched))
        if missing:
            raise ExportError(f"{len(missing)} quantized layers have no matching weight in the "
                              f"ONNX graph (first: {missing[:3]}); export the model returned by "
                              f"strip_fake_quant with the same weights")
        self._insert_nodes()
        self._drop_unused_initializers()
        return self.model

    def _insert_nodes(self) -> None:
        # weight DQs go first; activation Q/DQ go right after their tensor's producer
        nodes = list(self.g.node)
        head = [n for k, n in self.new_nodes if k == 0]
        acts = [n for k, n in self.new_nodes if k == 1]
        after: dict[str, list[onnx.NodeProto]] = {}
        front: list[onnx.NodeProto] = []
        produced = {o for n in nodes for o in n.output}
        q_source = {q.output[0]: q.input[0] for q in acts if q.op_type == "QuantizeLinear"}
        for n in acts:
            src = n.input[0]
            if n.op_type == "QuantizeLinear" and src in produced:
                after.setdefault(src, []).append(n)
            elif n.op_type == "QuantizeLinear":
                front.append(n)
            else:  # DQ follows its Q
                q_src = q_source[n.input[0]]
                (after[q_src] if q_src in produced else front).append(n)
        ordered = head + front
        for n in nodes:
            ordered.append(n)
            for o in n.output:
                ordered.extend(after.get(o, []))
        del self.g.node[:]
        self.g.node.extend(ordered)

    def _drop_unused_initializers(self) -> None:
        used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


def to_qdq(onnx_model: onnx.ModelProto, qstate: dict) -> onnx.ModelProto:
    """A copy of ``onnx_model`` in QDQ form (see the module docstring). Raises ExportError when
    a quantized layer has no matching weight in the graph or a weight is off its int8 grid."""
    if not qstate.get("format", "").startswith("sparsify.quant/"):
        raise ExportError("to_qdq needs the dict returned by sparsify.quant.quantization_state")
    opset = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ExportError(f"INT8 QDQ export needs opset >= 13 (per-channel DequantizeLinear); "
                          f"the graph has opset {opset}")
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    out = _Rewriter(model, qstate).run()
    log.info("QDQ: %d layers quantized, %d FP32 fallbacks", len(qstate.get("layers", {})),
             len(qstate.get("fallback", [])))
    return out
