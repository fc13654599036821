"""Latency and throughput of the engine against onnxruntime on the same file, in the same run.

    from sparsify.engine.bench import benchmark
    result = benchmark("model.onnx", batch=1, threads=2)
    print(result["speedup_vs_onnxruntime"])

Method (shared with ``scripts/bench_engine.py``): both runtimes load the same ONNX file and get
the same inputs; their outputs are compared first. They are then timed in alternating blocks:
within a block one runtime runs alone after its own warm-up, because calling them strictly in
turn let onnxruntime's spin-waiting worker threads hold a core during the engine's next call
(measured: ResNet-50 90% at 2 threads, 29.5 ms per call interleaved vs 17.5 ms alone). Each
block starts 50 ms after the one before, when the other runtime's threads have gone to sleep
(without the pause onnxruntime's threads, still spinning, doubled the time of the engine's first
MobileNetV2 calls after its warm-up: p90 7.7 ms against a 3.6 ms median). Blocks alternate so
that slow drift on a shared machine hits both alike. Speedups are ratios of medians.
"""

from __future__ import annotations

import os
import time

import numpy as np

from sparsify.errors import EngineError, InputError


def latency_stats(times_s) -> dict:
    """mean / p50 / p90 / p99 in milliseconds of a list of durations in seconds."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    return {"mean_ms": float(t.mean()), "p50_ms": float(np.percentile(t, 50)),
            "p90_ms": float(np.percentile(t, 90)), "p99_ms": float(np.percentile(t, 99)), "n": int(t.size)}


def time_blocks(runners: dict, warmup: int, repeats: int, blocks: int = 5,
                settle_s: float = 0.05) -> dict:
    """runner name -> latency_stats, each runner timed alone in its own block, blocks alternating.

    Each block starts ``settle_s`` after the previous one, so the other runtime's worker threads
    have stopped spinning and gone to sleep before its warm-up."""
    per_block = max(1, -(-repeats // blocks))
    times = {name: [] for name in runners}
    for _ in range(blocks):
        for name, fn in runners.items():
            time.sleep(settle_s)
            for _ in range(warmup):
                fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: latency_stats(t) for name, t in times.items()}


def _index_ranges(model) -> dict:
    """input name -> the row count of the constant tables it indexes through Gather (embeddings)."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    ranges: dict = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = tables[node.input[0]]
            if dims and -len(dims) <= axis < len(dims):
                size = dims[axis]
                ranges[node.input[1]] = min(size, ranges.get(node.input[1], size))
    return ranges


def sample_feeds(engine, batch: int = 1, seed: int = 0) -> dict:
    """Random inputs of the shapes the model declares: a symbolic first axis becomes ``batch``.

    Floats are uniform in [0, 1). Integer inputs that index a constant table (token ids into an
    embedding) are uniform over its rows, other integer inputs are zeros (all-zero ids would be
    all padding to many text models, a case that times and checks nothing). Any other symbolic
    axis cannot be guessed: give the inputs instead.
    """
    rng = np.random.default_rng(seed)
    ranges = _index_ranges(engine.model)
    feeds = {}
    for name, _, dtype, shape in engine.plan.inputs:
        if shape is None or dtype is None:
            raise InputError(f"input {name!r} declares no shape or type; pass the inputs explicitly "
                             "(--input NAME=FILE.npy)")
        dims = []
        for axis, d in enumerate(shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif axis == 0:
                dims.append(batch)
            else:
                raise InputError(f"input {name!r} has a symbolic size {d!r} on axis {axis}; pass the "
                                 "inputs explicitly (--input NAME=FILE.npy)")
        if dtype.kind == "f":
            feeds[name] = rng.random(dims).astype(dtype)
        elif dtype.kind in "iu" and ranges.get(name, 0) > 0:
            feeds[name] = rng.integers(0, ranges[name], size=dims).astype(dtype)
        elif dtype.kind in "iub":
            feeds[name] = np.zeros(dims, dtype)
        else:
            raise InputError(f"input {name!r} has dtype {dtype}; pass the inputs explicitly")
    return feeds


def _items(feeds: dict) -> int:
    """Items per call: the first input's leading size (1 for a scalar input)."""
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def ort_session(model, threads: int | None):
    """An onnxruntime CPU session with all graph optimizations, timed like the engine; ``model``
    is an .onnx path or a serialized model (bytes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_failure(err: Exception, what: str) -> EngineError:
    """onnxruntime's own exception (whatever its type) as an EngineError: ``what`` and its first
    line; any other exception is re-raised as it is."""
    if type(err).__module__.split(".")[0] != "onnxruntime":
        raise err
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return EngineError(what.format(reason=first))


def benchmark(model, *, batch: int = 1, threads: int | None = None, repeats: int = 30,
              warmup: int = 3, feeds: dict | None = None, onnxruntime: bool = True,
              profile: bool = False) -> dict:
    """Time ``model`` (an .onnx path) on the engine and, unless ``onnxruntime=False``, on
    onnxruntime with the same inputs; see the module docstring for the method.

    Returns ``{"batch", "threads", "items_per_call", "latency": {runtime: stats},
    "items_per_s": {runtime: ...}, "speedup_vs_onnxruntime", "max_rel_diff", "report"}`` and, with
    ``profile=True``, ``"profile"``: the engine's per-step times (``Engine.profile``).
    """
    from sparsify.engine.engine import Engine

    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
        raise InputError(f"repeats must be a positive integer, got {repeats!r}")
    engine = Engine(model, threads=threads)
    feeds = sample_feeds(engine, batch) if feeds is None else feeds
    runners = {"engine": lambda: engine.run(feeds)}
    result = {"batch": _items(feeds), "threads": threads, "items_per_call": _items(feeds)}
    outputs = engine.run(feeds)
    if onnxruntime:
        try:
            sess = ort_session(model, threads)
            want = sess.run(None, feeds)
        except Exception as err:  # noqa: BLE001 - onnxruntime's own types; others re-raised
            raise ort_failure(err, f"onnxruntime cannot run {os.fspath(model)} ({{reason}}); the "
                              "engine can: time it alone with --no-onnxruntime "
                              "(benchmark(..., onnxruntime=False))") from None
        diffs = []
        for got, ref in zip(outputs, want):
            ref = np.asarray(ref)
            if ref.dtype.kind == "f" and ref.size:
                scale = max(float(np.abs(ref).max()), 1e-30)
                diffs.append(float(np.abs(np.asarray(got, np.float64) - ref).max()) / scale)
        result["max_rel_diff"] = max(diffs) if diffs else 0.0
        runners["onnxruntime"] = lambda: sess.run(None, feeds)
    latency = time_blocks(runners, warmup, repeats)
    items = result["items_per_call"]
    result["latency"] = latency
    result["items_per_s"] = {k: 1e3 * items / v["p50_ms"] for k, v in latency.items()}
    if onnxruntime:
        result["speedup_vs_onnxruntime"] = latency["onnxruntime"]["p50_ms"] / latency["engine"]["p50_ms"]
    report = engine.report()
    result["report"] = {k: report[k] for k in ("num_layers", "sparse_layers", "dense_layers",
                                               "depthwise_layers", "fraction_of_native_ops")}
    if profile:
        result["profile"] = engine.profile(feeds, repeats=max(3, min(repeats, 20)))
    return result


def format_benchmark(result: dict, top: int = 15) -> str:
    """The text ``sparsify benchmark`` prints."""
    r = result["report"]
    lines = [f"batch {result['batch']}, threads {result['threads'] or 'all'}; engine: "
             f"{r['sparse_layers']} of {r['num_layers']} weight layers sparse, "
             f"{100 * r['fraction_of_native_ops']:.0f}% of ops native"]
    if "max_rel_diff" in result:
        lines.append(f"outputs agree with onnxruntime to {result['max_rel_diff']:.1e} (max |diff| / max |ref|)")
    lines.append(f"  {'runtime':<12} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'items/s':>10}")
    for name, s in result["latency"].items():
        lines.append(f"  {name:<12} {s['mean_ms']:>9.3f} {s['p50_ms']:>9.3f} {s['p90_ms']:>9.3f} "
                     f"{s['p99_ms']:>9.3f} {result['items_per_s'][name]:>10.1f}")
    if "speedup_vs_onnxruntime" in result:
        lines.append(f"engine speedup vs onnxruntime (ratio of medians): {result['speedup_vs_onnxruntime']:.2f}x")
    if "profile" in result:
        lines.append(format_profile(result["profile"], top))
    return "\n".join(lines)


def format_profile(rows: list, top: int = 15) -> str:
    """Time per op type, then the ``top`` slowest steps, from ``Engine.profile`` rows."""
    total = sum(r["ms"] for r in rows) or 1.0
    by_op: dict = {}
    for r in rows:
        by_op[r["op"]] = by_op.get(r["op"], 0.0) + r["ms"]
    lines = [f"engine profile: {len(rows)} steps, {total:.3f} ms in steps (medians)",
             "  by op:"]
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {ms:9.3f} ms {100 * ms / total:5.1f}%  {op}")
    lines.append(f"  slowest {min(top, len(rows))} steps:")
    for r in sorted(rows, key=lambda r: -r["ms"])[:top]:
        blocks = f", {r['blocks']} blocks" if r.get("blocks") else ""
        kind = f" [{r['kind']}{blocks}]" if r.get("kind") else ""
        lines.append(f"    {r['ms']:9.3f} ms {100 * r['ms'] / total:5.1f}%  {r['op']}{kind}  {r['name']}")
    return "\n".join(lines)
