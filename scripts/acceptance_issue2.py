"""Issue 2 acceptance: accuracy after pruning, measured on real data with the shipped recipes.

1. ResNet-18 on MNIST-5k (4,000 train / 1,000 held out): dense baseline (the demo's, cached)
   vs. fine-tuned under recipes/resnet18_mnist_prune90.yaml. Passes if the top-1 drop is at most
   1.0 point and every pruned Conv/Linear weight holds 90% zeros to within one element.
2. The transformer classifier on the movie-review sentences (7,000 train / 1,530 held out):
   dense baseline (AdamW, cached) vs. recipes/transformer_prune80.yaml. Passes if the drop is
   at most 2.0 points and every pruned Linear weight holds 80% zeros to within one element.

    .venv/bin/python scripts/acceptance_issue2.py [--only resnet18|transformer] [--json out.json]

Baselines are cached in $SPARSIFY_CACHE_DIR (default ~/.cache/sparsify), runs go to
$SPARSIFY_CACHE_DIR/acceptance/<task>. A finished run there is reused (--fresh reruns it).
On an idle 2-core machine: ResNet-18 about 5 minutes, transformer about 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time

from sparsify.data import load_dataset
from sparsify.demo import BASELINE, baseline_checkpoint, cache_dir, find_recipe, load_baseline
from sparsify.train import TrainConfig, evaluate, finetune

TASKS = {
    "resnet18": {
        "baseline": BASELINE,
        "recipe": "resnet18_mnist_prune90.yaml",
        "sparsity": 0.9, "dense_layers": {"conv1.weight"}, "max_drop": 1.0,
        "finetune": {},
    },
    "transformer": {
        "baseline": {"model_name": "transformer", "data_name": "movie_reviews", "epochs": 5,
                     "lr": 1e-3, "batch_size": 64, "optimizer": "adamw",
                     "weight_decay": 0.05},
        "recipe": "transformer_prune80.yaml",
        "sparsity": 0.8, "dense_layers": {"classifier.weight"}, "max_drop": 2.0,
        "finetune": {},
    },
}


def run_task(name: str, fresh: bool, progress: bool) -> dict:
    task = TASKS[name]
    spec = task["baseline"]
    t0 = time.perf_counter()
    baseline, cached = baseline_checkpoint(0, progress, spec)
    t1 = time.perf_counter()
    val = load_dataset(spec["data_name"], "val")
    dense_top1 = evaluate(load_baseline(baseline, spec), val)["top1"]

    out = cache_dir() / "acceptance" / name
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe(task["recipe"])
    cfg = TrainConfig(model=spec["model_name"], data=spec["data_name"], out=out,
                      progress=progress, **task["finetune"])
    finished = (out / "model.pt").exists()
    result = finetune(recipe, baseline, cfg, resume=(out / "checkpoints").exists())
    t2 = time.perf_counter()

    pruned_top1 = result.metrics[-1]["val_top1"]
    off = {}
    for layer, row in result.sparsity.items():
        target = 0 if layer in task["dense_layers"] else round(task["sparsity"] * row["numel"])
        if layer not in task["dense_layers"] and abs(row["zeros"] - target) > 1:
            off[layer] = row["sparsity"]
    drop = dense_top1 - pruned_top1
    return {
        "task": name, "recipe": str(recipe), "baseline": str(baseline),
        "dense_top1": round(dense_top1, 2), "pruned_top1": round(pruned_top1, 2),
        "drop_points": round(drop, 2), "max_drop": task["max_drop"],
        "target_sparsity": task["sparsity"],
        "overall_sparsity": round(result.overall_sparsity, 6),
        "layers_off_target": off,
        "layers": {k: round(v["sparsity"], 6) for k, v in result.sparsity.items()},
        "epochs": [m["val_top1"] for m in result.metrics],
        "baseline_seconds": None if cached else round(t1 - t0, 1),
        "finetune_seconds": None if finished else round(t2 - t1, 1),
        "passed": drop <= task["max_drop"] and not off,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="issue 2 accuracy acceptance")
    parser.add_argument("--only", choices=sorted(TASKS), action="append")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--fresh", action="store_true", help="rerun fine-tuning from scratch")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = []
    for name in args.only or list(TASKS):
        r = run_task(name, args.fresh, not args.no_progress)
        results.append(r)
        print(f"{name}: dense {r['dense_top1']:.2f}% -> pruned {r['pruned_top1']:.2f}% "
              f"(drop {r['drop_points']:+.2f}, limit {r['max_drop']}), "
              f"overall sparsity {100 * r['overall_sparsity']:.2f}%, "
              f"layers off target: {len(r['layers_off_target'])} -> "
              f"{'PASS' if r['passed'] else 'FAIL'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
