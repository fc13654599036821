"""Shared helpers for the engine tests: one-node models and comparisons with onnxruntime.

Test modules get them through the ``onnx_check`` fixture (a module cannot import conftest).

Relative error everywhere is ``max|a - b| / max|b|`` (the largest deviation measured against the
largest reference magnitude of that output), see docs/engine.md.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper


def _is_init(x) -> bool:
    """A test input written ("init", array) becomes an initializer instead of a graph input."""
    return isinstance(x, tuple) and len(x) == 2 and x[0] == "init"


def one_node_model(op: str, inputs: list, attrs: dict | None = None, n_outputs: int = 1,
                   opset: int = 17, domain: str = "") -> tuple[onnx.ModelProto, dict]:
    """A model holding one ``op`` node. ``inputs``: arrays (graph inputs), ("init", array)
    (initializers), or None (an omitted optional input). Returns the model and its feeds."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i, x in enumerate(inputs):
        if x is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if _is_init(x):
            inits.append(numpy_helper.from_array(x[1], name))
        else:
            x = np.asarray(x)
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape)))
            feeds[name] = x
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op, names, outs, name=f"the_{op}", domain=domain, **(attrs or {}))
    graph = helper.make_graph([node], f"one_{op}", graph_inputs,
                              [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8 if opset <= 17 else 9 if opset <= 20 else 10)
    return model, feeds


def ort_run(model, feeds: dict) -> list:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_same(got: list, want: list, tol: float, what: str = "") -> None:
    assert len(got) == len(want), f"{what}: {len(got)} outputs, onnxruntime gave {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"{what} output {i}: shape {a.shape} vs onnxruntime {b.shape}"
        assert a.dtype == b.dtype, f"{what} output {i}: dtype {a.dtype} vs onnxruntime {b.dtype}"
        if a.dtype.kind in "biuU":
            np.testing.assert_array_equal(a, b, err_msg=f"{what} output {i}")
        else:
            assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what} output {i}: NaNs differ"
            finite = ~np.isnan(b)
            err = rel_err(a[finite], b[finite])
            assert err <= tol, f"{what} output {i}: relative error {err:.3g} > {tol:g}"


@pytest.fixture(scope="session")
def onnx_check():
    """The helpers above, for test modules (they cannot import conftest)."""
    return SimpleNamespace(one_node_model=one_node_model, ort_run=ort_run, rel_err=rel_err,
                           assert_same=assert_same)
