"""What pruning bought: per-layer sparsity, parameter counts, dense vs sparse FLOPs.

``analyze(path)`` reads a checkpoint (``.pt`` / ``.safetensors``) or an ONNX file and returns a
plain dict (JSON-ready); ``format_report`` turns it into the table ``sparsify analyze`` prints.

FLOPs count 2 per multiply-accumulate of the Conv / Linear (Gemm, MatMul with a constant weight)
layers for one sample; "sparse" FLOPs skip the multiplications by zero weights. A checkpoint
needs its architecture (``model=``) for FLOPs; the other numbers come from the tensors alone.
Matmuls between activations (attention scores) are counted in ``other_flops``: pruning does not
touch them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from sparsify.errors import DataError, InputError, SparsifyError

# input presets beyond the shipped datasets: name -> (num_classes, model keyword arguments)
EXTRA_SHAPES = {"imagenet": (1000, {"in_channels": 3, "image_size": 224})}


def _layer(name: str, op: str, shape, numel: int, nonzero: int, flops: int | None) -> dict:
    density = nonzero / numel if numel else 1.0
    return {
        "name": name, "op": op, "shape": [int(s) for s in shape], "params": int(numel),
        "nonzero": int(nonzero), "sparsity": 1.0 - density,
        "dense_flops": None if flops is None else int(flops),
        "sparse_flops": None if flops is None else int(round(flops * density)),
    }


def _totals(layers: list[dict], other_flops: int | None) -> dict:
    params = sum(x["params"] for x in layers)
    nonzero = sum(x["nonzero"] for x in layers)
    total = {"params": params, "nonzero": nonzero,
             "sparsity": 1.0 - nonzero / params if params else 0.0}
    if layers and all(x["dense_flops"] is not None for x in layers):
        other = other_flops or 0
        dense = sum(x["dense_flops"] for x in layers) + other
        sparse = sum(x["sparse_flops"] for x in layers) + other
        total.update(dense_flops=dense, sparse_flops=sparse, other_flops=other,
                     flops_reduction=dense / sparse if sparse else None)
    return total


# ---------------------------------------------------------------------------------------------
# torch checkpoints


def _model_for(model: str, data: str | None):
    from sparsify.data import dataset_shape
    from sparsify.models import MODELS, TEXT_DEFAULTS, create_model

    if model not in MODELS:
        raise DataError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if data is None:
        data = "movie_reviews" if MODELS[model][1] is TEXT_DEFAULTS else "mnist"
    num_classes, kwargs = EXTRA_SHAPES[data] if data in EXTRA_SHAPES else dataset_shape(data)
    return create_model(model, num_classes=num_classes, **kwargs), kwargs


def _layer_flops(module, sample) -> tuple[dict[str, int], int]:
    """FLOPs per Conv/Linear module (forward hooks) and the model's total (FlopCounterMode)."""
    import torch
    import torch.nn as nn
    from torch.utils.flop_counter import FlopCounterMode

    per_layer: dict[str, int] = {}
    handles = []

    def hook(name):
        def count(mod, inputs, output):
            if isinstance(mod, nn.Linear):
                per_layer[name] = 2 * output.numel() * mod.in_features
            else:  # ConvNd: each output element sums in_channels/groups * kernel products
                k = mod.in_channels // mod.groups * int(np.prod(mod.kernel_size))
                per_layer[name] = 2 * output.numel() * k
        return count

    for name, mod in module.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(mod.register_forward_hook(hook(name)))
    module.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            module(sample)
    finally:
        for h in handles:
            h.remove()
    return per_layer, int(counter.get_total_flops())


def analyze_checkpoint(path: str | os.PathLike, model: str | None = None,
                       data: str | None = None) -> dict:
    import torch.nn as nn

    from sparsify.checkpoint import load_checkpoint, load_into
    from sparsify.models import sample_input

    path = Path(path)
    state = load_checkpoint(path)
    layers: list[dict] = []
    other = None
    if model is None:
        # no architecture: every weight with 2+ dimensions is a layer, FLOPs unknown
        for name, t in state.items():
            if t.dim() >= 2 and t.is_floating_point():
                layers.append(_layer(name, "tensor", t.shape, t.numel(),
                                     int((t != 0).sum()), None))
    else:
        net, kwargs = _model_for(model, data)
        load_into(net, state, path)
        sample = sample_input(model, 1, **kwargs)
        flops, total = _layer_flops(net, sample)
        for name, mod in net.named_modules():
            if name in flops:
                w = mod.weight.detach()
                op = "Linear" if isinstance(mod, nn.Linear) else type(mod).__name__
                layers.append(_layer(f"{name}.weight", op, w.shape, w.numel(),
                                     int((w != 0).sum()), flops[name]))
        other = max(total - sum(flops.values()), 0)
    return {"path": str(path), "kind": "checkpoint", "model": model,
            "layers": layers, "total": _totals(layers, other)}


# ---------------------------------------------------------------------------------------------
# ONNX files


def _dims(value_info) -> list[int] | None:
    if not value_info.type.HasField("tensor_type"):
        return None
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        # symbolic dims (batch, sequence) count as 1: FLOPs are reported per sample
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1)
    return dims


def analyze_onnx(path: str | os.PathLike) -> dict:
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist")
    try:
        proto = onnx.load(str(path))
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception as err:  # onnx raises several unrelated types for a bad file
        raise InputError(f"cannot read ONNX file {path}: {err}") from err
    if not proto.HasField("graph") or not proto.graph.output or proto.ir_version <= 0:
        raise InputError(f"{path} is not an ONNX model (no graph, outputs or IR version); is the "
                         "file truncated or of another format?")
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    shapes = {v.name: _dims(v) for v in list(graph.value_info) + list(graph.output)
              + list(graph.input)}

    def weight(name: str):
        if name not in inits:
            return None
        try:
            return numpy_helper.to_array(inits[name], base_dir=str(path.parent))
        except Exception as err:  # noqa: BLE001 - wrong raw_data length, missing external data
            raise InputError(f"{path}: initializer {name!r} cannot be read ({err})") from None

    layers, other = [], 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = shapes.get(node.output[0])
        w = weight(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv" and w is not None:
            k = int(np.prod(w.shape[1:]))
        elif w is not None:
            if w.ndim != 2 and (node.op_type == "Gemm" or w.ndim == 0):
                raise InputError(f"{path}: node {node.name!r} ({node.op_type}) has a weight of shape "
                                 f"{list(w.shape)}; {node.op_type} takes a matrix")
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            # MatMul: [K] or [..., K, N]
            k = int(w.shape[1] if node.op_type == "Gemm" and trans_b
                    else w.shape[0] if w.ndim == 1 else w.shape[-2])
        else:  # a matmul of two activations: its K is the first input's last dim
            a = shapes.get(node.input[0])
            k = a[-1] if a else None
        flops = 2 * int(np.prod(out)) * k if out and k else None
        if w is None:
            other += flops or 0
            continue
        # the legacy exporter names folded weights "onnx::Conv_250": the node name says more
        label = node.name if node.input[1].startswith("onnx::") and node.name else node.input[1]
        layers.append({**_layer(label, node.op_type, w.shape, w.size,
                                 int(np.count_nonzero(w)), flops), "node": node.name})
    report = {"path": str(path), "kind": "onnx", "model": graph.name or None,
              "layers": layers, "total": _totals(layers, other)}
    engine = _engine_report(path)
    if engine is not None:
        kinds = {row.get("name"): row.get("kind")
                 + (f" ({row['blocks']} blocks)" if row.get("blocks") else "")
                 for row in engine.get("layers", [])}
        for layer in layers:
            layer["engine"] = kinds.get(layer["node"])
        report["engine"] = {k: v for k, v in engine.items() if k != "layers"}
    return report


def _engine_report(path: Path) -> dict | None:
    """The sparse engine's view: which layers it runs sparse or dense, the share of native ops.

    None when the engine is not part of this installation; an engine that cannot plan the
    file gives ``{"runnable": False, "error": ...}`` rather than failing the analysis.
    """
    if importlib.util.find_spec("sparsify.engine.report") is None:
        return None
    try:
        from sparsify.engine.report import engine_report

        return engine_report(str(path))
    except (ImportError, SparsifyError) as err:
        return {"runnable": False, "error": " ".join(str(err).split())}
    except Exception as err:  # noqa: BLE001 - the analysis stands without the engine's view
        return {"runnable": False, "error": f"{type(err).__name__}: " + " ".join(str(err).split())}


# ---------------------------------------------------------------------------------------------


def analyze(path: str | os.PathLike, model: str | None = None, data: str | None = None) -> dict:
    """Per-layer sparsity, parameters and FLOPs of a checkpoint or ONNX file, as a dict."""
    path = Path(path)
    if path.suffix == ".onnx":
        if model is not None:
            raise InputError(f"{path} is an ONNX file: it carries its architecture, drop --model")
        return analyze_onnx(path)
    if model is None and data is not None:
        raise InputError("--data only matters with --model (it sets the model's input size)")
    return analyze_checkpoint(path, model=model, data=data)


def _flops(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_report(report: dict) -> str:
    """A fixed-width table of ``analyze``'s result."""
    layers, total = report["layers"], report["total"]
    width = max([len("layer")] + [len(x["name"]) for x in layers])
    engine = report.get("engine")
    head = (f"{'layer':<{width}}  {'op':<7} {'params':>10} {'sparsity':>8} "
            f"{'dense FLOPs':>11} {'sparse FLOPs':>12}" + ("  engine" if engine else ""))
    lines = [f"{report['kind']}: {report['path']}", head, "-" * len(head)]
    for x in layers:
        lines.append(f"{x['name']:<{width}}  {x['op']:<7} {x['params']:>10,} "
                     f"{100 * x['sparsity']:>7.2f}% {_flops(x['dense_flops']):>11} "
                     f"{_flops(x['sparse_flops']):>12}"
                     + (f"  {x.get('engine') or '-'}" if engine else ""))
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}  {'':<7} {total['params']:>10,} "
                 f"{100 * total['sparsity']:>7.2f}% {_flops(total.get('dense_flops')):>11} "
                 f"{_flops(total.get('sparse_flops')):>12}")
    if total.get("other_flops"):
        lines.append(f"(totals include {_flops(total['other_flops'])} FLOPs of activation "
                     f"matmuls that pruning does not reduce)")
    if total.get("flops_reduction"):
        lines.append(f"FLOPs reduction: {total['flops_reduction']:.2f}x")
    if engine:
        if engine.get("runnable") is False:
            why = engine.get("error") or "; ".join(engine.get("unsupported", []))
            lines.append(f"engine: cannot run this file ({why})")
        else:
            lines.append(
                f"engine: {engine.get('sparse_layers', 0)} sparse, "
                f"{engine.get('dense_layers', 0)} dense, "
                f"{engine.get('depthwise_layers', 0)} depthwise layers; "
                f"{100 * engine.get('fraction_of_native_ops', 0.0):.1f}% of ops run natively")
    return "\n".join(lines)
