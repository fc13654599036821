"""What the engine makes of a model: per-layer sparse/dense choice and the share of native ops.

``fraction_of_native_ops`` counts the graph's original nodes. Each node ends up in one of three
groups once the plan is built:
- native: executed inside a C++ kernel call: Conv/Gemm/MatMul with constant weights and every
  node fused into them (BatchNormalization, bias and residual Add, Relu, Clip), pooling;
- numpy: executed by a NumPy op function (elementwise math, reshapes, softmax, ...);
- folded: gone at load (constant folding, Identity, Dropout, Shape of a static shape).
fraction_of_native_ops = native / (native + numpy): of the nodes that still do work at run time,
the share the C++ core runs. Folded nodes cost nothing per call and are left out.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def plan_report(plan) -> dict:
    kinds = Counter(plan.node_kinds.values())
    native, numpy_, folded = kinds.get("native", 0), kinds.get("numpy", 0), kinds.get("folded", 0)
    layers = [dict(row) for row in plan.layers]
    by_kind = Counter(row["kind"] for row in layers)
    numpy_ops = Counter(s.op for s in plan.steps if not s.native)
    return {
        "layers": layers,
        "num_layers": len(layers),
        "sparse_layers": by_kind.get("sparse", 0),
        "dense_layers": by_kind.get("dense", 0),
        "depthwise_layers": by_kind.get("depthwise", 0),
        "nodes": {"total": native + numpy_ + folded, "native": native, "numpy": numpy_, "folded": folded},
        "fraction_of_native_ops": native / (native + numpy_) if native + numpy_ else 1.0,
        "numpy_ops": dict(numpy_ops.most_common()),
        "steps": len(plan.steps),
    }


def engine_report(model) -> dict:
    """Plan ``model`` (a path or ModelProto) and describe it; see the module docstring.

    A graph with ops the engine cannot run still gets a report: ``runnable`` is False and
    ``unsupported`` holds the load error's lines (one per node).
    """
    from sparsify.engine.engine import Engine
    from sparsify.errors import UnsupportedOpError

    try:
        report = Engine(model).report()
    except UnsupportedOpError as err:
        lines = str(err).splitlines()
        return {"runnable": False, "unsupported": [x.strip() for x in lines[1:-1]],
                "fraction_of_native_ops": 0.0, "layers": []}
    report["runnable"] = True
    return report


def format_outputs(names: list, outputs: list, max_rows: int = 8) -> str:
    """One line per output: shape, dtype, range; plus the top-1 index per row of a 2-D float."""
    lines = []
    for name, y in zip(names, outputs):
        line = f"{name}: shape {list(y.shape)} {y.dtype}"
        if y.size and y.dtype.kind in "fiu":
            finite = y[np.isfinite(y)] if y.dtype.kind == "f" else y
            if finite.size:
                line += f", min {finite.min():.6g} max {finite.max():.6g} mean {finite.mean():.6g}"
            if finite.size < y.size:
                line += f", {y.size - finite.size} non-finite"
        if y.ndim == 2 and y.dtype.kind == "f" and y.shape[1] > 1:
            top = np.argmax(y[:max_rows], axis=1).tolist()
            line += f"; top-1 per row: {top}{' ...' if y.shape[0] > max_rows else ''}"
        lines.append(line)
    return "\n".join(lines)
