"""Benchmark sparsify's CPU engine against onnxruntime (and torch eager) on the same ONNX files.

    python scripts/bench_engine.py                       # everything, 2 threads
    python scripts/bench_engine.py --only resnet50_90 --repeats 50 --json bench.json

Cases (random weights; "90" = the smallest 90% of each weight zeroed by magnitude):
  resnet50_90    torchvision ResNet-50, every Conv but the first 90% sparse, batch 1 and 16
  resnet50_4x1_90  the same, 90% sparse in 4x1 blocks (four consecutive output channels keep the
                 same inputs: recipes' mask_type 4x1, which the engine's block kernel runs);
                 also mobilenet_v2_4x1_90 and bert_4x1_90
  resnet50_dense the same network with dense weights, batch 1 and 16
  mobilenet_v2_90  MobileNetV2, every 1x1/3x3 Conv but the first and the depthwise ones 90% sparse
  bert_90        a BERT-base-shaped encoder (hidden 768, 12 heads, FFN 3072, sequence 128,
                 --bert-layers layers, 12 by default), every MatMul weight 90% sparse
  overhead       a chain of 100 tiny Relu/Add nodes: the engine's per-op Python cost
The classifier Gemm of the CNNs stays dense (<1% of their work). The BERT encoder is
sparsify.models' transformer classifier at BERT-base sizes (token ids in, class logits out).

Method: each model is exported once (cached in --workdir) and both runtimes load the SAME file.
The engine, onnxruntime (ORT_ENABLE_ALL, intra_op_num_threads = --threads) and torch eager
(dense weights; its speed does not depend on zeros) take turns in 5 blocks: each runtime is timed
alone within a block after its own warm-up (the others' spinning worker threads would otherwise
steal a core), and blocks alternate so that drift on a shared machine hits all of them alike. Reported: latency mean/p50/p90/p99
at batch 1, throughput (items/s from the median) at --batch, and engine/ORT speedups computed
from medians of the same run. Outputs are checked against onnxruntime before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TARGETS = {  # case -> minimum engine speedup over onnxruntime at batch 1 (the targets)
    "resnet50_90": 3.0,
    "bert_90": 3.0,
    "resnet50_dense": 1 / 1.25,
}


# ---------------------------------------------------------------- models
def _torch_model(case: str, bert_layers: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    if case.startswith("resnet50"):
        return torchvision.models.resnet50(weights=None).eval(), "input"
    if case.startswith("mobilenet_v2"):
        return torchvision.models.mobilenet_v2(weights=None).eval(), "input"
    from sparsify.models import create_model

    model = create_model("transformer", vocab_size=1000, max_len=128, dim=768, layers=bert_layers,
                         heads=12, mlp_dim=3072, dropout=0.0)
    return model.eval(), "ids"


def _sample(case: str, batch: int):
    if case.startswith("bert"):
        rng = np.random.default_rng(batch)
        return rng.integers(1, 1000, (batch, 128)).astype(np.int64)
    return np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def _prune(model: onnx.ModelProto, sparsity: float, skip_depthwise: bool,
           rows: int = 1) -> onnx.ModelProto:
    """Zero the smallest ``sparsity`` of each Conv (but the first) and MatMul weight; the final
    classifier Gemm stays dense (it is <1% of the work). With ``rows`` > 1, Conv weights lose
    whole blocks of ``rows`` consecutive output channels at one input position, smallest L1
    norm first (the 4x1 mask of sparsify's recipes)."""
    inits = {t.name: t for t in model.graph.initializer}
    convs_seen = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Conv":
            convs_seen += 1
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if convs_seen == 1 or (group > 1 and skip_depthwise):
                continue
        w = numpy_helper.to_array(inits[node.input[1]]).copy()
        k = int(w.size * sparsity)
        if w.ndim < 2 or k == 0:
            continue
        # output channels: a Conv weight's first axis, a MatMul weight's ([in, out]) last
        out_axis = 0 if node.op_type == "Conv" else w.ndim - 1
        if rows > 1 and w.shape[out_axis] % rows == 0:
            if out_axis == 0:
                blocks = w.reshape(w.shape[0] // rows, rows, -1)  # [O/4, 4, rest]
                score = np.abs(blocks).sum(axis=1)
            else:
                blocks = w.reshape(-1, w.shape[-1] // rows, rows)  # [in, out/4, 4]
                score = np.abs(blocks).sum(axis=2)
            flat = score.ravel()
            keep = np.ones(flat.size, bool)
            keep[np.argpartition(flat, k // rows - 1)[:k // rows]] = False
            keep = keep.reshape(score.shape)
            blocks *= keep[:, None, :] if out_axis == 0 else keep[:, :, None]
        else:
            w.ravel()[np.argpartition(np.abs(w).ravel(), k - 1)[:k]] = 0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    return model


def build_file(case: str, workdir: Path, bert_layers: int) -> Path:
    """Export (once) and prune; returns the path of the case's ONNX file."""
    import torch

    base = "bert" if case.startswith("bert") else case.split("_")[0]
    if case.startswith("mobilenet_v2"):
        base = "mobilenet_v2"
    tag = f"{base}{bert_layers}" if base == "bert" else base
    dense = workdir / f"{tag}_dense.onnx"
    if not dense.exists():
        model, name = _torch_model(case, bert_layers)
        x = torch.from_numpy(_sample(case, 1))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(dense), opset_version=17, dynamo=False,
                              input_names=[name], output_names=["output"],
                              dynamic_axes={name: {0: "batch"}, "output": {0: "batch"}})
    if case.endswith("_dense"):
        return dense
    blocks = "_4x1" if "_4x1_" in case else ""
    path = workdir / f"{tag}{blocks}_90.onnx"
    if not path.exists():
        model = _prune(onnx.load(str(dense)), 0.9, skip_depthwise=case.startswith("mobilenet"),
                       rows=4 if blocks else 1)
        onnx.save(model, str(path))
    return path


def overhead_model(n: int = 100) -> onnx.ModelProto:
    """x [1, 16] -> n alternating Relu / Add(constant) nodes."""
    nodes, prev = [], "x"
    for i in range(n):
        out = f"v{i}"
        nodes.append(helper.make_node("Relu", [prev], [out]) if i % 2 == 0
                     else helper.make_node("Add", [prev, "c"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "overhead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 16])],
                              [numpy_helper.from_array(np.full(16, 0.01, np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ---------------------------------------------------------------- timing
# The timing method (alternating blocks, each runtime alone within its block) is the package's:
# sparsify.engine.bench, shared with `sparsify benchmark`.
from sparsify.engine.bench import ort_session, time_blocks as time_interleaved  # noqa: E402


def make_runners(path: Path, case: str, batch: int, threads: int, with_torch: bool, bert_layers: int):
    from sparsify.engine import Engine

    engine = Engine(path, threads=threads)
    sess = ort_session(path, threads)
    name = engine.input_names[0]
    x = _sample(case, batch)
    feeds = {name: x}
    got, want = engine.run(feeds)[0], sess.run(None, feeds)[0]
    rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    runners = {"engine": lambda: engine.run(feeds), "onnxruntime": lambda: sess.run(None, feeds)}
    if with_torch:
        import torch

        torch.set_num_threads(threads)
        model, _ = _torch_model(case, bert_layers)
        xt = torch.from_numpy(x)

        def run_torch():
            with torch.inference_mode():
                model(xt)
        runners["torch"] = run_torch
    report = engine.report()
    info = {"rel_err_vs_ort": rel, "sparse_layers": report["sparse_layers"], "layers": report["num_layers"],
            "block_layers": sum(1 for row in report["layers"] if row.get("blocks")),
            "fraction_of_native_ops": report["fraction_of_native_ops"]}
    return runners, info


def bench_case(case, args, workdir) -> dict:
    path = build_file(case, workdir, args.bert_layers)
    out = {"file": str(path)}
    for batch in (1, args.batch):
        if batch != 1 and case.startswith(("mobilenet", "bert")) and not args.all_batches:
            continue
        print(f"timing {case} at batch {batch} ...", file=sys.stderr, flush=True)
        runners, info = make_runners(path, case, batch, args.threads, not args.no_torch, args.bert_layers)
        repeats = args.repeats if batch == 1 else max(5, args.repeats // 4)
        res = time_interleaved(runners, args.warmup, repeats)
        med = {k: v["p50_ms"] for k, v in res.items()}
        entry = {"latency": res, **info, "items_per_s": {k: 1e3 * batch / v for k, v in med.items()},
                 "speedup_vs_ort": med["onnxruntime"] / med["engine"]}
        if "torch" in med:
            entry["speedup_vs_torch"] = med["torch"] / med["engine"]
        out[f"batch{batch}"] = entry
        del runners
    return out


def bench_overhead(args) -> dict:
    import onnxruntime as ort

    from sparsify.engine import Engine

    model = overhead_model(100)
    engine = Engine(model, threads=args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones((1, 16), np.float32)}
    res = time_interleaved({"engine": lambda: engine.run(feeds), "onnxruntime": lambda: sess.run(None, feeds)},
                           args.warmup, max(args.repeats, 50))
    n = len(engine.plan.steps)
    return {"nodes": 100, "engine_steps": n, "latency": res,
            "engine_us_per_op": 1e3 * res["engine"]["p50_ms"] / n,
            "ort_us_per_op": 1e3 * res["onnxruntime"]["p50_ms"] / 100}


# ---------------------------------------------------------------- output
def print_case(case: str, r: dict) -> None:
    for key in ("batch1", next((k for k in r if k.startswith("batch") and k != "batch1"), None)):
        if not key or key not in r:
            continue
        e = r[key]
        lat = e["latency"]
        blocks = f" ({e['block_layers']} in 4x1 blocks)" if e.get("block_layers") else ""
        print(f"\n{case} {key}  (engine: {e['sparse_layers']}/{e['layers']} layers sparse{blocks}, "
              f"{100 * e['fraction_of_native_ops']:.0f}% ops native; rel. err vs ORT {e['rel_err_vs_ort']:.1e})")
        print(f"  {'runtime':<12} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'items/s':>9}")
        for k, v in lat.items():
            print(f"  {k:<12} {v['mean_ms']:>9.2f} {v['p50_ms']:>9.2f} {v['p90_ms']:>9.2f} {v['p99_ms']:>9.2f} "
                  f"{e['items_per_s'][k]:>9.1f}")
        line = f"  engine speedup vs onnxruntime: {e['speedup_vs_ort']:.2f}x"
        if "speedup_vs_torch" in e:
            line += f", vs torch eager: {e['speedup_vs_torch']:.2f}x"
        if key == "batch1" and case in TARGETS:
            target = TARGETS[case]
            ok = e["speedup_vs_ort"] >= target
            line += f"  [target >= {target:.2f}x: {'met' if ok else 'MISSED'}]"
        print(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="timed rounds at batch 1 (batch N: a quarter)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="the throughput batch size")
    p.add_argument("--all-batches", action="store_true", help="also time MobileNetV2 and BERT at --batch")
    p.add_argument("--bert-layers", type=int, default=12)
    p.add_argument("--only", default=None, help="comma-separated cases: " + ", ".join(
        ["resnet50_90", "resnet50_4x1_90", "resnet50_dense", "mobilenet_v2_90", "bert_90",
         "overhead"]))
    p.add_argument("--no-torch", action="store_true", help="skip torch eager")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("SPARSIFY_CACHE_DIR",
                                                                       Path.home() / ".cache" / "sparsify")) / "bench_engine")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    cases = ["resnet50_90", "resnet50_4x1_90", "resnet50_dense", "mobilenet_v2_90", "bert_90",
             "overhead"]
    if args.only:
        cases = [c.strip() for c in args.only.split(",")]
    from sparsify.engine import kernels

    results = {"threads": args.threads, "isa": kernels.isa(), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "bert_layers": args.bert_layers, "cases": {}}
    print(f"sparsify engine benchmark: {args.threads} threads, ISA {results['isa']}, {os.cpu_count()} cores, "
          f"medians of {args.repeats} calls per runtime, timed in alternating blocks")
    for case in cases:
        if case == "overhead":
            r = bench_overhead(args)
            results["cases"][case] = r
            print(f"\noverhead: {r['nodes']} Relu/Add nodes on a [1, 16] tensor: engine "
                  f"{r['engine_us_per_op']:.2f} us per op (p50 {r['latency']['engine']['p50_ms']:.3f} ms), "
                  f"onnxruntime {r['ort_us_per_op']:.2f} us per op")
            continue
        r = bench_case(case, args, args.workdir)
        results["cases"][case] = r
        print_case(case, r)
    if args.json:
        from sparsify.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
