"""Benchmark sparsify's C++ kernels against onnxruntime and numpy on ResNet-50 and BERT shapes.

For every shape, in the same run: onnxruntime (a one-node Conv / MatMul model, ORT_ENABLE_ALL),
numpy's matmul (OpenBLAS) where the op is a plain GEMM, the dense kernel, and the sparse kernel
at several sparsities (random unstructured masks) and at 90% in 4x1 blocks (block90: four
consecutive output channels share each kept input, the shape the block kernel runs). Times are medians over repeats; GFLOP/s are
"effective" (dense FLOPs / time), so a sparse kernel's number is comparable with the dense ones.

    python scripts/bench_kernels.py                     # 2 threads, wall clock
    python scripts/bench_kernels.py --threads 1 --timer cpu   # per-thread CPU time: stable on a
                                                               # shared machine (1 thread only)
    python scripts/bench_kernels.py --json out.json --only resnet   # or bert, windows, attention
    python scripts/bench_kernels.py --only crossover --threads 1 --timer cpu --stat min

The summary line per suite gives the geometric mean of (dense time / sparse time) at 90%, as a
fraction of the ideal 10x, and the crossover sparsity where the sparse kernel starts to win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# numpy's BLAS fixes its thread count at import: match --threads before importing it
os.environ.setdefault("OPENBLAS_NUM_THREADS", next(
    (sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "2"))

import numpy as np  # noqa: E402

# ResNet-50 (torchvision v1.5) at 224x224, batch 1: (name, C_in, C_out, k, stride, H_in, count)
RESNET50_CONVS = [
    ("l1.c1", 64, 64, 1, 1, 56, 1), ("l1.c2", 64, 64, 3, 1, 56, 3), ("l1.c3", 64, 256, 1, 1, 56, 3),
    ("l1.ds", 64, 256, 1, 1, 56, 1), ("l1.c1b", 256, 64, 1, 1, 56, 2),
    ("l2.c1", 256, 128, 1, 1, 56, 1), ("l2.c2s", 128, 128, 3, 2, 56, 1),
    ("l2.c3", 128, 512, 1, 1, 28, 4), ("l2.ds", 256, 512, 1, 2, 56, 1),
    ("l2.c1b", 512, 128, 1, 1, 28, 3), ("l2.c2", 128, 128, 3, 1, 28, 3),
    ("l3.c1", 512, 256, 1, 1, 28, 1), ("l3.c2s", 256, 256, 3, 2, 28, 1),
    ("l3.c3", 256, 1024, 1, 1, 14, 6), ("l3.ds", 512, 1024, 1, 2, 28, 1),
    ("l3.c1b", 1024, 256, 1, 1, 14, 5), ("l3.c2", 256, 256, 3, 1, 14, 5),
    ("l4.c1", 1024, 512, 1, 1, 14, 1), ("l4.c2s", 512, 512, 3, 2, 14, 1),
    ("l4.c3", 512, 2048, 1, 1, 7, 3), ("l4.ds", 1024, 2048, 1, 2, 14, 1),
    ("l4.c1b", 2048, 512, 1, 1, 7, 2), ("l4.c2", 512, 512, 3, 1, 7, 2),
]
# BERT-base, 128 tokens: (name, in, out, count per layer)
BERT_LINEARS = [("qkv/out", 768, 768, 4), ("ffn1", 768, 3072, 1), ("ffn2", 3072, 768, 1)]
SPARSITIES = (0.7, 0.8, 0.9, 0.95)
# MobileNetV2 / EfficientNet-B0 depthwise convs and ResNet's stem max pool: (C, H_in, k, stride)
DEPTHWISE = [(32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (144, 56, 3, 2), (192, 28, 3, 1),
             (384, 14, 3, 1), (576, 14, 3, 2), (960, 7, 3, 1), (240, 28, 5, 1), (672, 14, 5, 2)]


def timer_fn(kind: str):
    return time.thread_time if kind == "cpu" else time.perf_counter


STAT = np.median


def measure(fn, repeat: int, clock) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(STAT(times))


def ort_session(node_builder, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes, inits, x_shape, y_shape = node_builder(helper, onnx.numpy_helper)
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def random_mask(shape, sparsity: float, rng) -> np.ndarray:
    return rng.random(shape) >= sparsity


def block_mask(shape, sparsity: float, rng) -> np.ndarray:
    """4x1 blocks: four consecutive rows (output channels) share each kept column."""
    return np.repeat(rng.random((shape[0] // 4, shape[1])) >= sparsity, 4, axis=0)


def bench_conv(row, args, rng, kernels):
    name, cin, cout, k, stride, h, count = row
    pad = k // 2
    x = rng.standard_normal((1, cin, h, h)).astype(np.float32)
    w4 = (rng.standard_normal((cout, cin, k, k)) * 0.05).astype(np.float32)
    oh = (h + 2 * pad - k) // stride + 1
    flops = 2.0 * cout * cin * k * k * oh * oh

    def build(helper, nh):
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k],
                                strides=[stride, stride], pads=[pad] * 4)
        return [node], [nh.from_array(w4, "w")], list(x.shape), [1, cout, oh, oh]

    clock = timer_fn(args.timer)
    sess = ort_session(build, args.threads)
    res = {"name": name, "shape": f"{cin}->{cout} k{k} s{stride} {h}x{h}", "count": count,
           "gflop": flops / 1e9}
    res["ort"] = measure(lambda: sess.run(None, {"x": x}), args.repeat, clock)
    conv = lambda pw, y: kernels.conv2d(pw, x, (k, k), (stride, stride), (pad,) * 4, (1, 1), 1,
                                        out=y)
    y = np.empty((1, cout, oh, oh), np.float32)
    pd = kernels.PackedWeight.pack(w4.reshape(cout, -1), "dense")
    res["dense"] = measure(lambda: conv(pd, y), args.repeat, clock)
    if k == 1 and stride == 1:
        w2, x2 = w4.reshape(cout, cin), x.reshape(cin, -1)
        y2 = y.reshape(cout, -1)
        res["numpy"] = measure(lambda: np.matmul(w2, x2, out=y2), args.repeat, clock)
    for s in SPARSITIES:
        ws = w4.reshape(cout, -1) * random_mask((cout, cin * k * k), s, rng)
        ps = kernels.PackedWeight.pack(ws, "sparse")
        res[f"sparse{int(s * 100)}"] = measure(lambda: conv(ps, y), args.repeat, clock)
    pb = kernels.PackedWeight.pack(w4.reshape(cout, -1) * block_mask((cout, cin * k * k), 0.9, rng),
                                   "sparse")
    res["block90"] = measure(lambda: conv(pb, y), args.repeat, clock)
    return res


def bench_linear(row, args, rng, kernels, tokens=128):
    name, fin, fout, count = row
    x = rng.standard_normal((tokens, fin)).astype(np.float32)
    w = (rng.standard_normal((fout, fin)) * 0.05).astype(np.float32)
    flops = 2.0 * tokens * fin * fout

    def build(helper, nh):
        node = helper.make_node("MatMul", ["x", "wt"], ["y"])
        return [node], [nh.from_array(np.ascontiguousarray(w.T), "wt")], [tokens, fin], \
            [tokens, fout]

    clock = timer_fn(args.timer)
    sess = ort_session(build, args.threads)
    res = {"name": name, "shape": f"{tokens}x{fin} @ {fin}x{fout}", "count": count,
           "gflop": flops / 1e9}
    res["ort"] = measure(lambda: sess.run(None, {"x": x}), args.repeat, clock)
    y = np.empty((tokens, fout), np.float32)
    wt = np.ascontiguousarray(w.T)
    res["numpy"] = measure(lambda: np.matmul(x, wt, out=y), args.repeat, clock)
    pd = kernels.PackedWeight.pack(w, "dense")
    res["dense"] = measure(lambda: kernels.linear(pd, x, out=y), args.repeat, clock)
    for s in SPARSITIES:
        ps = kernels.PackedWeight.pack(w * random_mask(w.shape, s, rng), "sparse")
        res[f"sparse{int(s * 100)}"] = measure(lambda: kernels.linear(ps, x, out=y), args.repeat,
                                               clock)
    pb = kernels.PackedWeight.pack(w * block_mask(w.shape, 0.9, rng), "sparse")
    res["block90"] = measure(lambda: kernels.linear(pb, x, out=y), args.repeat, clock)
    return res


def bench_windows(args, rng, kernels) -> list[dict]:
    """Depthwise conv (+ bias, ReLU6) and the ResNet stem's max pool against onnxruntime."""
    clock = timer_fn(args.timer)
    rows = []
    print("\n== depthwise conv / max pool: time (us), onnxruntime / ours (>1 = faster) ==")
    for c, h, k, stride in DEPTHWISE + [("maxpool", 112, 3, 2)]:
        pool = c == "maxpool"
        ch = 64 if pool else c
        pad = k // 2
        oh = (h + 2 * pad - k) // stride + 1
        x = rng.standard_normal((1, ch, h, h)).astype(np.float32)
        w = rng.standard_normal((ch, 1, k, k)).astype(np.float32)
        b = rng.standard_normal(ch).astype(np.float32)

        def build(helper, nh):
            if pool:
                node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k],
                                        strides=[stride] * 2, pads=[pad] * 4)
                return [node], [], list(x.shape), [1, ch, oh, oh]
            conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], group=ch, kernel_shape=[k, k],
                                    strides=[stride] * 2, pads=[pad] * 4)
            clip = helper.make_node("Clip", ["c", "lo", "hi"], ["y"])
            inits = [nh.from_array(w, "w"), nh.from_array(b, "b"),
                     nh.from_array(np.array(0, np.float32), "lo"),
                     nh.from_array(np.array(6, np.float32), "hi")]
            return [conv, clip], inits, list(x.shape), [1, ch, oh, oh]

        sess = ort_session(build, args.threads)
        t_ort = measure(lambda: sess.run(None, {"x": x}), args.repeat, clock)
        if pool:
            ours = lambda: kernels.max_pool2d(x, (k, k), (stride,) * 2, (pad,) * 4)
        else:
            ours = lambda: kernels.depthwise_conv2d(w, x, (stride,) * 2, (pad,) * 4, (1, 1), b,
                                                    ("clip", 0.0, 6.0))
        t_ours = measure(ours, args.repeat, clock)
        name = "maxpool 64" if pool else f"dw {c}"
        rows.append({"name": name, "h": h, "k": k, "stride": stride, "ort": t_ort, "ours": t_ours})
        print(f"{name:10s} {h:3d}x{h:<3d} k{k} s{stride}: ort {t_ort * 1e6:8.1f}  ours "
              f"{t_ours * 1e6:8.1f}  ratio {t_ort / t_ours:5.2f}")
    print(f"geomean ratio {gmean([r['ort'] / r['ours'] for r in rows]):.2f}")
    return rows


def bench_attention(args, rng, kernels) -> list[dict]:
    """BERT-base's other kernels (12 heads, 128 tokens, hidden 768) against one-node ORT models:
    softmax over the scores, LayerNormalization, the two batched attention matmuls, and GELU as
    a separate op against the cost it adds to the FFN kernel's epilogue."""
    clock = timer_fn(args.timer)
    heads, seq, hid, dh = 12, 128, 768, 64
    scores = rng.standard_normal((1, heads, seq, seq)).astype(np.float32)
    hidden = rng.standard_normal((1, seq, hid)).astype(np.float32)
    q = rng.standard_normal((1, heads, seq, dh)).astype(np.float32)
    kt = rng.standard_normal((1, heads, dh, seq)).astype(np.float32)
    scale = rng.standard_normal(hid).astype(np.float32)
    bias = rng.standard_normal(hid).astype(np.float32)
    w1 = (rng.standard_normal((4 * hid, hid)) * random_mask((4 * hid, hid), 0.9, rng)).astype(np.float32)
    pw1 = kernels.PackedWeight.pack(w1, "sparse")
    ffn_in = hidden.reshape(seq, hid)

    def one(op, inputs, x_shape, y_shape, inits=(), **attrs):
        def build(helper, nh):
            return ([helper.make_node(op, ["x", *inputs], ["y"], **attrs)],
                    [nh.from_array(v, k) for k, v in inits], x_shape, y_shape)
        return build

    cases = [
        ("softmax 12x128x128", one("Softmax", [], list(scores.shape), list(scores.shape), axis=-1),
         scores, lambda: kernels.softmax(scores)),
        ("layernorm 128x768", one("LayerNormalization", ["s", "b"], list(hidden.shape),
                                  list(hidden.shape), [("s", scale), ("b", bias)]),
         hidden, lambda: kernels.layer_norm(hidden, scale, bias)),
        ("q @ k^T 12x128x64", one("MatMul", ["k"], list(q.shape), [1, heads, seq, seq], [("k", kt)]),
         q, lambda: kernels.batched_matmul(q, kt)),
        ("gelu 128x3072", None, None,
         lambda: kernels.linear(pw1, ffn_in, act="gelu")),
    ]
    rows = []
    print("\n== attention-block kernels: time (us), onnxruntime / ours (>1 = faster) ==")
    for name, build, x, ours in cases:
        t_ours = measure(ours, args.repeat, clock)
        if build is None:  # GELU: what the fused epilogue adds to the sparse FFN kernel
            t_plain = measure(lambda: kernels.linear(pw1, ffn_in), args.repeat, clock)
            rows.append({"name": name, "ours": t_ours, "without": t_plain})
            print(f"{name:20s} fused into the 90% sparse FFN kernel: {t_plain * 1e6:8.1f} -> "
                  f"{t_ours * 1e6:8.1f}  (+{(t_ours - t_plain) * 1e6:.1f})")
            continue
        sess = ort_session(build, args.threads)
        t_ort = measure(lambda: sess.run(None, {"x": x}), args.repeat, clock)
        rows.append({"name": name, "ort": t_ort, "ours": t_ours})
        print(f"{name:20s} ort {t_ort * 1e6:8.1f}  ours {t_ours * 1e6:8.1f}  ratio "
              f"{t_ort / t_ours:5.2f}")
    return rows


def crossover(args, rng, kernels) -> list[dict]:
    """Per shape, the sparsity where the sparse kernel starts to beat the dense one (GEMM form,
    X [K, N] as the conv/linear lowering feeds it), interpolated between measured points."""
    clock = timer_fn(args.timer)
    grid = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    shapes = sorted({(cout, cin * k * k, (h // stride) ** 2) for _, cin, cout, k, stride, h, _
                     in RESNET50_CONVS} | {(fout, fin, 128) for _, fin, fout, _ in BERT_LINEARS})
    rows = []
    print("\n== crossover: sparse / dense time by sparsity (GEMM M x K x N) ==")
    for m, k, n in shapes:
        w = rng.standard_normal((m, k)).astype(np.float32)
        x = rng.standard_normal((k, n)).astype(np.float32)
        y = np.empty((m, n), np.float32)
        pd = kernels.PackedWeight.pack(w, "dense")
        dense = measure(lambda: kernels.gemm(pd, x, out=y), args.repeat, clock)
        ratios = []
        for s in grid:
            ps = kernels.PackedWeight.pack(w * random_mask(w.shape, s, rng), "sparse")
            ratios.append(measure(lambda: kernels.gemm(ps, x, out=y), args.repeat, clock) / dense)
        cross = next((grid[i - 1] + (grid[i] - grid[i - 1]) * (ratios[i - 1] - 1)
                      / (ratios[i - 1] - ratios[i])
                      for i in range(1, len(grid)) if ratios[i - 1] >= 1 > ratios[i]),
                     grid[0] if ratios[0] < 1 else None)
        rows.append({"m": m, "k": k, "n": n, "ratios": ratios, "crossover": cross})
        print(f"{m:5d} x {k:5d} x {n:5d}: " + " ".join(f"{s:.1f}:{r:4.2f}" for s, r in
                                                        zip(grid, ratios))
              + f"  -> crossover {cross if cross is None else round(cross, 2)}")
    return rows


def gmean(values) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def report(title: str, rows: list[dict]) -> dict:
    cols = (["ort", "numpy", "dense"] + [f"sparse{int(s * 100)}" for s in SPARSITIES]
            + (["block90"] if all("block90" in r for r in rows) else []))
    print(f"\n== {title}: effective GFLOP/s (dense FLOPs / median time) ==")
    print(f"{'layer':8s} {'shape':28s} " + " ".join(f"{c:>9s}" for c in cols)
          + f" {'dense/ort':>9s} {'sp90 x':>7s}")
    for r in rows:
        cells = [f"{r['gflop'] / r[c]:9.0f}" if c in r else f"{'-':>9s}" for c in cols]
        print(f"{r['name']:8s} {r['shape']:28s} " + " ".join(cells)
              + f" {r['ort'] / r['dense']:9.2f} {r['dense'] / r['sparse90']:7.2f}")
    total = {c: sum(r[c] * r["count"] for r in rows) for c in cols if all(c in r for r in rows)}
    print("weighted sum (ms): " + "  ".join(f"{c} {t * 1e3:.2f}" for c, t in total.items()))
    summary = {"dense_vs_ort_geomean": gmean([r["ort"] / r["dense"] for r in rows]),
               "total_ms": {c: t * 1e3 for c, t in total.items()}}
    for s in SPARSITIES:
        key = f"sparse{int(s * 100)}"
        summary[f"{key}_vs_dense_geomean"] = gmean([r["dense"] / r[key] for r in rows])
        summary[f"{key}_vs_ort_geomean"] = gmean([r["ort"] / r[key] for r in rows])
    sp90 = summary["sparse90_vs_dense_geomean"]
    print(f"dense kernel vs onnxruntime (time ratio, >1 = faster): "
          f"{summary['dense_vs_ort_geomean']:.2f}x geomean")
    for s in SPARSITIES:
        key = f"sparse{int(s * 100)}"
        print(f"sparse {int(s * 100)}%: {summary[key + '_vs_dense_geomean']:.2f}x our dense, "
              f"{summary[key + '_vs_ort_geomean']:.2f}x onnxruntime (geomean)")
    print(f"sparse 90% reaches {sp90:.2f}x over dense = {sp90 / 10 * 100:.0f}% of the ideal 10x")
    if "block90" in cols:  # 4x1 block pruning at 90%: the block kernel
        summary["block90_vs_dense_geomean"] = gmean([r["dense"] / r["block90"] for r in rows])
        summary["block90_vs_ort_geomean"] = gmean([r["ort"] / r["block90"] for r in rows])
        print(f"4x1 blocks 90%: {summary['block90_vs_dense_geomean']:.2f}x our dense, "
              f"{summary['block90_vs_ort_geomean']:.2f}x onnxruntime (geomean)")
    # crossover: lowest tested sparsity where sparse beats dense on the weighted total
    summary["crossover"] = next((s for s in SPARSITIES
                                 if total.get(f"sparse{int(s * 100)}", 1e9) < total["dense"]), None)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                    help="cpu = per-thread CPU time (only meaningful with --threads 1)")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="min = least disturbed repeat, for tuning on a busy shared machine")
    ap.add_argument("--only", choices=["resnet", "bert", "windows", "attention", "crossover"],
                    default=None)
    ap.add_argument("--json", default=None, help="write the raw medians here")
    args = ap.parse_args()
    if args.timer == "cpu" and args.threads != 1:
        ap.error("--timer cpu measures one thread; use it with --threads 1")
    from sparsify.engine import kernels

    global STAT
    STAT = np.min if args.stat == "min" else np.median
    kernels.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"isa={kernels.isa()} threads={args.threads} timer={args.timer} "
          f"repeat={args.repeat} stat={args.stat}")
    out = {}
    if args.only in (None, "resnet"):
        rows = [bench_conv(r, args, rng, kernels) for r in RESNET50_CONVS]
        out["resnet50"] = {"rows": rows, "summary": report("ResNet-50 convs, batch 1", rows)}
    if args.only in (None, "bert"):
        rows = [bench_linear(r, args, rng, kernels) for r in BERT_LINEARS]
        out["bert"] = {"rows": rows, "summary": report("BERT-base linears, 128 tokens", rows)}
    if args.only in (None, "windows"):
        out["windows"] = bench_windows(args, rng, kernels)
    if args.only in (None, "attention"):
        out["attention"] = bench_attention(args, rng, kernels)
    if args.only == "crossover":
        out["crossover"] = crossover(args, rng, kernels)
    if args.json:
        from sparsify.fileio import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())


if __name__ == "__main__":
    main()
