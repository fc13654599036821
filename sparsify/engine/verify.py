"""Check the engine against onnxruntime on one model and one set of inputs.

    result = verify("model.onnx")                    # outputs only
    result = verify("model.onnx", per_node=True)     # and every value both runtimes compute
    print(format_verify(result))

The outputs are compared as the tests compare them: ``max |engine - ort| / max |ort|`` per
output, NaN where onnxruntime has NaN. With ``per_node`` every value the engine's plan computes
(what fusion left of the graph: a Conv's output that its ReLU consumed inside the kernel is gone)
is also asked of onnxruntime, by making it a graph output, and compared in plan order; the first
one past the tolerance names the node where the two runtimes part. The values the engine's
transformer blocks keep feature-major are transposed back first; values whose shapes still differ
are counted as not compared.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx

from sparsify.errors import InputError


def _rel_diff(got, ref) -> float:
    """max |got - ref| / max |ref| over the finite entries; inf where the NaN or inf positions
    differ (a disagreement whatever the tolerance)."""
    got, ref = np.asarray(got), np.asarray(ref)
    if ref.dtype.kind not in "fc":
        return 0.0 if np.array_equal(got, ref) else float("inf")
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(got[~finite], ref[~finite],
                                                                           equal_nan=True):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(ref[finite]).max()), 1e-30)
    return float(np.abs(got[finite] - ref[finite]).max()) / scale


def _as_graph_layout(got: np.ndarray, shape: tuple) -> np.ndarray:
    """An engine value in the graph's layout: the transformer blocks keep values passed
    between them feature-major, [features, ...] for the graph's [..., features]."""
    shape = tuple(shape)
    if got.shape != shape and got.ndim == len(shape) >= 2 and got.shape[0] == shape[-1] \
            and got.shape[1:] == shape[:-1]:
        return np.moveaxis(got, 0, -1)
    return got


def _ort_runner(proto: onnx.ModelProto, names: list[str], threads):
    """A function feeds -> {name: onnxruntime's value} for ``names`` (graph outputs or
    intermediate values, which become graph outputs of a copy of the model)."""
    from sparsify.engine.bench import ort_failure, ort_session

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    present = {o.name for o in model.graph.output}
    extra = [n for n in names if n not in present]
    if extra:
        typed = {}
        try:  # graph outputs need a type: take it from shape inference where it knows one
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
            typed = {v.name: v for v in inferred.graph.value_info}
        except Exception:  # noqa: BLE001 - untyped outputs are still accepted below
            pass
        for name in extra:
            info = typed.get(name)
            model.graph.output.append(info if info is not None and info.type.HasField("tensor_type")
                                      else onnx.helper.make_empty_tensor_value_info(name))
    why = ("onnxruntime cannot run this model ({reason}), so there is nothing to verify the "
           "engine against")
    try:
        sess = ort_session(model.SerializeToString(), threads)
    except Exception as err:  # noqa: BLE001 - onnxruntime's own types; others re-raised
        raise ort_failure(err, why) from None
    wanted = [o.name for o in sess.get_outputs() if o.name in set(names)]

    def run(feeds: dict) -> dict:
        try:
            return dict(zip(wanted, sess.run(wanted, feeds)))
        except Exception as err:  # noqa: BLE001
            raise ort_failure(err, why) from None
    return run


def _dataset_inputs(engine, data: str, split: str, limit: int | None):
    """(input name, inputs as numpy, labels) of a built-in dataset, checked against the
    model's single input."""
    from sparsify.data import load_dataset

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    dataset = load_dataset(data, split)
    if len(engine.plan.inputs) != 1:
        raise InputError(f"a dataset feeds models with one input; this one has {engine.input_names}")
    name, _, dtype, shape = engine.plan.inputs[0]
    x, y = dataset.inputs.numpy(), dataset.labels.numpy()
    if limit is not None:
        x, y = x[:limit], y[:limit]
    fits = shape is None or (len(shape) == x.ndim and all(
        not isinstance(d, int) or d <= 0 or d == got for d, got in zip(shape[1:], x.shape[1:])))
    if not fits:
        raise InputError(f"the model's input {name!r} has shape [{', '.join(map(str, shape))}], "
                         f"{data}'s items are {list(x.shape[1:])}: verify it on the data it was "
                         "trained for")
    if dtype is not None and x.dtype != dtype:
        if x.dtype.kind != dtype.kind:
            raise InputError(f"the model's input {name!r} is {dtype}, {data}'s items are {x.dtype}")
        x = x.astype(dtype)
    return name, x, y


def _dataset_check(engine, proto, name, x, y, threads, chunk: int = 250) -> dict:
    """Top-1 of both runtimes over the items, how often their predictions agree, and the
    largest relative difference of their first outputs."""
    first = engine.output_names[0]
    ort_run = _ort_runner(proto, [first], threads)
    ours, theirs = [], []
    for i in range(0, len(x), chunk):
        feeds = {name: x[i:i + chunk]}
        ours.append(np.asarray(engine.run(feeds)[0]))
        theirs.append(np.asarray(ort_run(feeds)[first]))
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    if ours.ndim != 2:
        raise InputError(f"the model's first output has shape {list(ours.shape)}; a dataset check "
                         "needs [items, classes] scores")
    return {"items": len(y),
            "top1": {"engine": 100.0 * float((ours.argmax(1) == y).mean()),
                     "onnxruntime": 100.0 * float((theirs.argmax(1) == y).mean())},
            "agreement": 100.0 * float((ours.argmax(1) == theirs.argmax(1)).mean()),
            "rel_diff": _rel_diff(ours, theirs)}


def verify(model, feeds: dict | None = None, *, batch: int = 1, threads: int | None = None,
           per_node: bool = False, tolerance: float = 1e-4, data: str | None = None,
           split: str = "val", limit: int | None = None) -> dict:
    """Run ``model`` (an .onnx path, a ModelProto or an ``Engine``) on the engine and on
    onnxruntime with the same inputs (``feeds``, or random ones of the declared shapes with the
    batch axis set to ``batch``) and compare.

    With ``data`` (a built-in dataset name, as for ``sparsify apply``), the items of its
    ``split`` (the first ``limit``) go through both runtimes too: ``result["dataset"]`` holds
    ``{"name", "split", "items", "top1": {"engine", "onnxruntime"}, "agreement", "rel_diff"}``
    (agreement: the share of items whose top class is the same), and the per-output and per-node
    checks run on its first ``batch`` items.

    Returns ``{"ok", "tolerance", "outputs": [{"name", "shape", "rel_diff", "ok"}], "nodes": [...],
    "compared", "not_compared", "first_divergence"}``; ``nodes`` (with ``per_node``) holds one
    row per value, ``{"name", "node", "op", "shape", "rel_diff", "ok"}`` in plan order, with
    ``rel_diff`` None for a value whose shape differs between the runtimes.
    """
    from sparsify.engine.bench import sample_feeds
    from sparsify.engine.engine import Engine

    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not np.isfinite(tolerance) or tolerance < 0:
        raise InputError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    engine = model if isinstance(model, Engine) else Engine(model, threads=threads)
    dataset = None
    if data is not None:
        if feeds is not None:
            raise InputError("give feeds or data, not both")
        name, x, y = _dataset_inputs(engine, data, split, limit)
        dataset = {"name": data, "split": split,
                   **_dataset_check(engine, engine.model, name, x, y, threads)}
        feeds = {name: x[:batch]}
    if feeds is None:
        feeds = sample_feeds(engine, batch)
    proto = engine.model
    names = engine.output_names
    ours = dict(zip(names, engine.run(feeds)))
    values = engine.run_values(feeds) if per_node else {}
    graph_values = {o for n in proto.graph.node for o in n.output}
    inner = [n for n in values if n in graph_values and n not in ours]
    theirs = _ort_runner(proto, names + inner, threads)(feeds)

    outputs = []
    for name in names:
        got, ref = np.asarray(ours[name]), np.asarray(theirs[name])
        diff = _rel_diff(got, ref) if got.shape == ref.shape else float("inf")
        outputs.append({"name": name, "shape": list(ref.shape), "rel_diff": diff,
                        "ok": diff <= tolerance})
    producer = {o: (n.name or n.op_type, n.op_type) for n in proto.graph.node for o in n.output}
    nodes, first = [], None
    for name in inner + [n for n in names if per_node]:
        if name not in theirs:
            continue
        got, ref = np.asarray(values.get(name, ours.get(name))), np.asarray(theirs[name])
        node, op = producer.get(name, (None, None))
        row = {"name": name, "node": node, "op": op, "shape": list(ref.shape), "rel_diff": None,
               "ok": None}
        got = _as_graph_layout(got, ref.shape)
        if got.shape == ref.shape:
            row["rel_diff"] = _rel_diff(got, ref)
            row["ok"] = row["rel_diff"] <= tolerance
            if not row["ok"] and first is None:
                first = row
        nodes.append(row)
    compared = sum(r["rel_diff"] is not None for r in nodes)
    result = {"ok": all(o["ok"] for o in outputs), "tolerance": tolerance, "outputs": outputs,
              "nodes": nodes, "compared": compared, "not_compared": len(nodes) - compared,
              "first_divergence": first}
    if dataset is not None:
        result["dataset"] = dataset
        result["ok"] = result["ok"] and dataset["rel_diff"] <= tolerance
    return result


def format_verify(result: dict, top: int = 5) -> str:
    """The result as text: each output's difference, and the per-node summary if there is one."""
    tol = result["tolerance"]
    lines = [f"{'output':32s} {'shape':>18s} {'max rel diff':>13s}"]
    for o in result["outputs"]:
        mark = "ok" if o["ok"] else f"ABOVE {tol:g}"
        lines.append(f"{o['name'][:32]:32s} {str(o['shape']):>18s} {o['rel_diff']:13.2e}  {mark}")
    if result["nodes"]:
        lines.append(f"\nper node: {result['compared']} value(s) compared with onnxruntime"
                     + (f", {result['not_compared']} not (the engine holds them in another shape)"
                        if result["not_compared"] else ""))
        first = result["first_divergence"]
        if first is None:
            lines.append(f"every compared value within {tol:g}")
        else:
            lines.append(f"first value past {tol:g}: {first['name']!r} from node {first['node']!r} "
                         f"({first['op']}), max rel diff {first['rel_diff']:.2e}")
        worst = sorted((r for r in result["nodes"] if r["rel_diff"] is not None),
                       key=lambda r: -r["rel_diff"])[:top]
        lines.append("largest differences:")
        lines += [f"  {r['rel_diff']:.2e}  {r['name']} ({r['op']})" for r in worst]
    ds = result.get("dataset")
    if ds:
        lines.append(f"\n{ds['name']} ({ds['split']}, {ds['items']} items): top-1 engine "
                     f"{ds['top1']['engine']:.2f}%, onnxruntime {ds['top1']['onnxruntime']:.2f}%; "
                     f"same top class on {ds['agreement']:.2f}% of items; scores within "
                     f"{ds['rel_diff']:.2e}")
    lines.append("verdict: " + ("the engine agrees with onnxruntime" if result["ok"]
                                else f"outputs differ from onnxruntime by more than {tol:g}"))
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> None:
    from sparsify.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2, default=float) + "\n")
