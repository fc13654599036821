"""onnxruntime latency of sparsify's FP32 and INT8 exports: the baselines the engine must beat.

    python scripts/bench_ort_baselines.py [--threads 2] [--out bench_ort_baselines.json]

Models: ResNet-18 on MNIST (1x28x28; the trained 90% pruned checkpoint when one is cached),
ResNet-50 at 3x224x224 (random dense weights) and the pretrained ImageNet MobileNetV2 at
3x224x224 (dense, as shipped). onnxruntime sees no speedup from zeros (0.96-1.01x measured), so
dense weights give the same baseline; random weights are not pruned because that shrinks the
activations into float denormals, which slow FP32 arithmetic by an order of magnitude. Each file is exported
with ``sparsify.export`` (checked), then timed at batch 1 and 16 with the CPU provider, all
graph optimizations, ``--threads`` intra-op threads: warm-up, then the median of repeated runs,
FP32 and INT8 runs interleaved so that a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsify.export import export, model_from_checkpoint
from sparsify.models import create_model, pretrained_mobilenet_v2, sample_input

log = logging.getLogger("bench_ort_baselines")


def models() -> dict[str, tuple[nn.Module, torch.Tensor, str]]:
    from sparsify.demo import cache_dir

    out = {}
    work = cache_dir() / "acceptance_issue3"
    candidates = (cache_dir() / "demo-run" / "model.pt", work / "r18_prune90" / "model.pt",
                  work / "r18_prune90_quant_session.pt")
    found = next((p for p in candidates if p.is_file()), None)
    if found:
        r18, x = model_from_checkpoint(found, "resnet18")
        out["resnet18_mnist"] = (r18, x, f"pruned checkpoint {found}")
    else:
        torch.manual_seed(0)
        out["resnet18_mnist"] = (create_model("resnet18").eval(), sample_input("resnet18"),
                                 "random weights (dense; no trained checkpoint cached)")
    torch.manual_seed(0)
    img = {"in_channels": 3, "image_size": 224}
    # dense: pruning random weights shrinks activations layer by layer into float denormals,
    # which slow FP32 arithmetic and would make the baseline meaningless
    out["resnet50_224"] = (create_model("resnet50", num_classes=1000, **img).eval(),
                           sample_input("resnet50", **img), "random weights (dense)")
    out["mobilenet_v2_224"] = (pretrained_mobilenet_v2(), sample_input("mobilenet_v2", **img),
                               "pretrained ImageNet weights (dense)")
    return out


def photo_batches(x1: torch.Tensor) -> list[torch.Tensor]:
    """scikit-image's colour photos, center-cropped and ImageNet-normalized, as one batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quantize_mobilenet import center_crop, load_photos

    return [torch.stack([center_crop(p) for p in load_photos().values()])]


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict, x: np.ndarray, min_runs: int = 20,
                     budget_s: float = 8.0) -> dict[str, list[float]]:
    """Time every session on ``x``, alternating run by run, so that load from other processes
    hits all of them alike and their ratio stays meaningful on a busy machine."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    while True:
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
        n = len(next(iter(times.values())))
        if n >= min_runs and (time.perf_counter() - start > budget_s or n >= 300):
            return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_ort_baselines.json"))
    parser.add_argument("--only", default=None, help="comma-separated model keys")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    results: dict = {"threads": args.threads, "onnxruntime": ort.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (model, x1, what) in models().items():
            if args.only and key not in args.only.split(","):
                continue
            entry: dict = {"weights": what, "input": list(x1.shape[1:])}
            paths = {}
            # INT8 is calibrated on real images (a lone random sample gives ranges so poor that
            # the export's own accuracy check rejects the file)
            calib = photo_batches(x1) if x1.shape[1:] == (3, 224, 224) else None
            for fmt in ("fp32", "int8"):
                paths[fmt] = Path(tmp) / f"{key}_{fmt}.onnx"
                entry[f"{fmt}_bytes"] = export(model, paths[fmt], x1, format=fmt,
                                               calibration_data=calib).file_size
            sessions = {fmt: session(p, args.threads) for fmt, p in paths.items()}
            for batch in (1, 16):
                x = x1.repeat(batch, *([1] * (x1.dim() - 1))).numpy()
                for fmt, times in time_interleaved(sessions, x).items():
                    med = statistics.median(times)
                    entry[f"{fmt}_b{batch}_ms"] = round(1e3 * med, 3)
                    entry[f"{fmt}_b{batch}_runs"] = len(times)
                    if batch > 1:
                        entry[f"{fmt}_b{batch}_items_per_s"] = round(batch / med, 1)
                    log.info("%s %s b%d: median %.2f ms (%d runs)", key, fmt, batch, 1e3 * med,
                             len(times))
            entry["int8_speedup_b1"] = round(entry["fp32_b1_ms"] / entry["int8_b1_ms"], 2)
            entry["int8_speedup_b16"] = round(entry["fp32_b16_ms"] / entry["int8_b16_ms"], 2)
            results["models"][key] = entry
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'model':<18} {'fp32 b1 ms':>10} {'int8 b1 ms':>10} {'fp32 b16 img/s':>15} "
          f"{'int8 b16 img/s':>15}")
    for key, e in results["models"].items():
        print(f"{key:<18} {e['fp32_b1_ms']:>10.2f} {e['int8_b1_ms']:>10.2f} "
              f"{e['fp32_b16_items_per_s']:>15.1f} {e['int8_b16_items_per_s']:>15.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
