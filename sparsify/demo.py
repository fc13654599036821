"""The demo behind ``sparsify demo`` / ``make demo``: a whole pruning run in a few minutes.

1. Train a dense ResNet-18 on MNIST-5k (4,000 train images) once; the checkpoint is cached in
   ``$SPARSIFY_CACHE_DIR`` (default ``~/.cache/sparsify``) and reused by later runs.
2. Fine-tune it under the shipped recipe ``recipes/resnet18_mnist_prune90.yaml`` (every conv
   and linear weight except the first conv pruned to 90%, unstructured, cubic schedule).
3. Report per-layer sparsity and top-1 accuracy on the 1,000 held-out images, before and after.
4. Export the pruned model to ONNX (sparse FP32, checked by onnxruntime), run the held-out images
   through sparsify's engine (top-1, and how far its logits are from torch's), and time the
   engine against onnxruntime on the same file in the same run at batch 1 and 16.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


from sparsify.checkpoint import load_checkpoint, load_into, save_checkpoint
from sparsify.data import load_dataset
from sparsify.errors import CheckpointError, InputError
from sparsify.models import create_model
from sparsify.recipe import load_recipe
from sparsify.train import (CHECKPOINT_DIR, TrainConfig, check_output_dir, epoch_checkpoints,
                            evaluate, finetune, train_baseline)

log = logging.getLogger(__name__)

DEMO_RECIPE = "resnet18_mnist_prune90.yaml"
# dense baseline: 3 epochs of SGD with a cosine LR (about 75 s on 2 idle cores)
BASELINE = {"model_name": "resnet18", "data_name": "mnist", "epochs": 3, "lr": 0.05,
            "batch_size": 64, "weight_decay": 5e-4}
_BASELINE_VERSION = 1  # bump when BASELINE or the architecture changes


def cache_dir() -> Path:
    """Where trained baselines are kept: $SPARSIFY_CACHE_DIR, default ~/.cache/sparsify."""
    return Path(os.environ.get("SPARSIFY_CACHE_DIR") or Path.home() / ".cache" / "sparsify")


def find_recipe(name: str) -> Path:
    """A shipped recipe by file name: the repository's ``recipes/`` in a source checkout (or an
    editable install), else ``sparsify/recipes`` inside an installed package."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "recipes" / name]
    try:
        candidates.append(Path(str(resources.files("sparsify").joinpath("recipes", name))))
    except (ModuleNotFoundError, TypeError):
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise InputError(f"shipped recipe {name!r} not found (looked in "
                     f"{', '.join(str(p.parent) for p in candidates)}); pass --recipe PATH")


@dataclass
class EngineCheck:
    """Step 4: the exported file on sparsify's engine."""
    onnx_path: Path
    top1: float  # on the held-out images, through the engine
    max_rel_diff: float  # engine logits vs torch's: max |difference| / max |torch logit|
    sparse_layers: int
    layers: int
    threads: int
    latency: dict[int, dict[str, float]]  # batch -> engine / onnxruntime p50 ms, speedup
    seconds: float


@dataclass
class DemoResult:
    dense_top1: float
    pruned_top1: float
    layers: dict[str, dict]
    overall_sparsity: float
    baseline_path: Path
    out: Path
    recipe: Path
    baseline_cached: bool
    seconds: dict[str, float] = field(default_factory=dict)
    engine: EngineCheck | None = None


def load_baseline(path: Path, spec: dict | None = None):
    """The model a baseline checkpoint holds (``spec``: a BASELINE-like dict)."""
    from sparsify.data import dataset_shape

    spec = spec or BASELINE
    num_classes, kwargs = dataset_shape(spec["data_name"])
    model = create_model(spec["model_name"], num_classes=num_classes, **kwargs)
    return load_into(model, load_checkpoint(path), path)


def baseline_checkpoint(seed: int = 0, progress: bool = True,
                        spec: dict | None = None) -> tuple[Path, bool]:
    """The cached dense baseline checkpoint (trained now if missing). Returns (path, cached).

    ``spec`` holds train_baseline's arguments (default: the demo's BASELINE); the cache key
    covers all of them, so a changed setting trains a new baseline.
    """
    spec = spec or BASELINE
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = "_".join(f"{v}" for k, v in sorted(spec.items()) if k not in ("model_name", "data_name"))
    path = folder / (f"{spec['model_name']}_{spec['data_name']}_{key}_seed{seed}"
                     f"_v{_BASELINE_VERSION}.pt")
    if path.is_file():
        try:
            load_baseline(path, spec)
            return path, True
        except CheckpointError as err:
            log.warning("cached baseline %s is unusable (%s); training a new one", path, err)
    model, metrics = train_baseline(seed=seed, progress=progress, **spec)
    save_checkpoint(path, model.state_dict(), metadata={
        "model": spec["model_name"], "data": spec["data_name"], "epochs": str(spec["epochs"]),
        "val_top1": f"{metrics[-1]['val_top1']:.2f}"})
    return path, False


def check_on_engine(model, val, out_dir: Path, threads: int | None = None,
                    batches: tuple[int, ...] = (1, 16), repeats: int = 30) -> EngineCheck:
    """Export ``model`` to ``out_dir/model.onnx`` (FP32) and run ``val`` through the engine:
    top-1, distance from torch's logits, and engine vs onnxruntime latency per batch size."""
    import numpy as np
    import torch

    from sparsify.engine import Engine, kernels
    from sparsify.engine.bench import benchmark
    from sparsify.export import export

    t0 = time.perf_counter()
    x, y = val.inputs, val.labels
    path = Path(out_dir) / "model.onnx"
    if path.exists():
        path.unlink()  # our own file from an earlier run: export refuses to overwrite
    export(model.eval(), path, x[:1], format="fp32")
    engine = Engine(path, threads=threads)
    name = engine.input_names[0]
    logits = np.concatenate([engine.run({name: x[i:i + 250].numpy()})[0]
                             for i in range(0, len(x), 250)])
    with torch.no_grad():
        ref = model(x).numpy()
    report = engine.report()
    latency = {}
    for batch in batches:
        r = benchmark(path, batch=batch, threads=threads, repeats=repeats)
        latency[batch] = {"engine_ms": r["latency"]["engine"]["p50_ms"],
                          "onnxruntime_ms": r["latency"]["onnxruntime"]["p50_ms"],
                          "speedup": r["speedup_vs_onnxruntime"]}
    return EngineCheck(
        onnx_path=path, top1=100.0 * float((logits.argmax(1) == y.numpy()).mean()),
        max_rel_diff=float(np.abs(logits - ref).max() / max(float(np.abs(ref).max()), 1e-30)),
        sparse_layers=report["sparse_layers"], layers=report["num_layers"],
        threads=threads or kernels.get_num_threads(), latency=latency,
        seconds=time.perf_counter() - t0)


def run_demo(recipe: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
             seed: int = 0, progress: bool = True, engine: bool = True,
             threads: int | None = None) -> DemoResult:
    """Baseline (cached), prune under ``recipe`` (default: the shipped 90% recipe), compare;
    with ``engine``, export the result and check it on sparsify's engine (``check_on_engine``,
    ``threads`` for the engine and onnxruntime: default, the engine's)."""
    recipe_path = Path(recipe) if recipe else find_recipe(DEMO_RECIPE)
    # every input is checked before the baseline is trained (minutes) or loaded
    rec = load_recipe(recipe_path)
    run_dir = Path(out) if out else cache_dir() / "demo-run"
    config = TrainConfig(model=BASELINE["model_name"], data=BASELINE["data_name"], out=run_dir,
                         seed=seed, progress=progress)
    if out is not None:
        check_output_dir(run_dir)
        if epoch_checkpoints(run_dir):
            raise InputError(f"--out {run_dir} already holds a run ({CHECKPOINT_DIR}/); choose "
                             f"another --out")
    t0 = time.perf_counter()
    baseline, cached = baseline_checkpoint(seed, progress)
    t1 = time.perf_counter()

    val = load_dataset(BASELINE["data_name"], "val")
    dense_top1 = evaluate(load_baseline(baseline), val)["top1"]

    if out is None and run_dir.exists():
        shutil.rmtree(run_dir)  # our own scratch folder from an earlier demo
    result = finetune(rec, baseline, config)
    t2 = time.perf_counter()
    checked = check_on_engine(result.model, val, run_dir, threads) if engine else None
    return DemoResult(
        dense_top1=dense_top1, pruned_top1=result.metrics[-1]["val_top1"],
        layers=result.sparsity, overall_sparsity=result.overall_sparsity,
        baseline_path=baseline, out=run_dir, recipe=recipe_path, baseline_cached=cached,
        seconds={"baseline": t1 - t0, "prune": t2 - t1, "total": time.perf_counter() - t0},
        engine=checked)


def format_demo(r: DemoResult) -> str:
    width = max(len(name) for name in r.layers)
    lines = [
        f"baseline  {r.baseline_path} ({'cached' if r.baseline_cached else 'trained'} in "
        f"{r.seconds['baseline']:.0f} s)",
        f"recipe    {r.recipe}",
        f"output    {r.out}",
        "",
        f"{'layer':<{width}}  {'shape':<16} {'params':>9}  sparsity",
    ]
    for name, x in r.layers.items():
        shape = "x".join(map(str, x["shape"]))
        lines.append(f"{name:<{width}}  {shape:<16} {x['numel']:>9,}  {100 * x['sparsity']:6.2f}%")
    lines += [
        f"{'all conv/linear weights':<{width}}  {'':<16} "
        f"{sum(x['numel'] for x in r.layers.values()):>9,}  {100 * r.overall_sparsity:6.2f}%",
        "",
        f"top-1 on the held-out {BASELINE['data_name']} images: dense {r.dense_top1:.2f}%  ->  "
        f"pruned {r.pruned_top1:.2f}%  ({r.pruned_top1 - r.dense_top1:+.2f} points)",
        f"fine-tuning took {r.seconds['prune']:.0f} s",
    ]
    e = r.engine
    if e is not None:
        lines += [
            "",
            f"exported  {e.onnx_path} (sparse FP32, checked by onnxruntime)",
            f"engine    {e.sparse_layers} of {e.layers} weight layers run sparse; top-1 on the "
            f"held-out images {e.top1:.2f}% (torch {r.pruned_top1:.2f}%),",
            f"{'':<10}logits within {e.max_rel_diff:.1e} of torch's (max |difference| / max |logit|)",
        ]
        for batch, t in e.latency.items():
            lines.append(f"{'latency' if batch == min(e.latency) else '':<10}batch {batch:<3} "
                         f"engine {t['engine_ms']:7.2f} ms   onnxruntime {t['onnxruntime_ms']:7.2f}"
                         f" ms   {t['speedup']:.2f}x  ({e.threads} threads, medians, same run)")
    return "\n".join(lines)
