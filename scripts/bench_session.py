"""Time a training step with a pruning session against plain training on the same model.

    python scripts/bench_session.py                       # ResNet-18, 28x28, batch 64, CPU
    python scripts/bench_session.py --device cuda --steps 50

Both loops run the same model, data and SGD optimizer, alternating step by step so that drift
in machine load hits both alike. The session runs the shipped 90% recipe in the middle of its
pruning ramp (masks on every Conv/Linear weight but the stem). Reported:
- median step time of each loop and their ratio (steady state: masks applied to weights after
  every step and to gradients in backward; goal <= 1.10);
- the cost of one mask update (recomputing every mask) and the ratio with that cost spread over
  the steps between updates (update_frequency 0.5 epoch at 63 steps per epoch for MNIST-5k).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsify
from sparsify.models import create_model

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "resnet18_mnist_prune90.yaml"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(model, opt, session, batches, device, step_calls=None) -> list[float]:
    times = []
    for x, y in batches:
        sync(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if session is not None:
            sync(device)
            before = time.perf_counter()
            session.step()
            sync(device)
            if step_calls is not None:
                step_calls.append(time.perf_counter() - before)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=63, help="4,000 MNIST-5k images / 64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    base = create_model(args.model).to(device)
    g = torch.Generator().manual_seed(0)
    batch = [
        (torch.randn(args.batch_size, 1, 28, 28, generator=g).to(device),
         torch.randint(0, 10, (args.batch_size,), generator=g).to(device))
        for _ in range(4)
    ]

    plain = copy.deepcopy(base)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    pruned = copy.deepcopy(base)
    pruned_opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    recipe = sparsify.load_recipe(RECIPE)
    # start mid-ramp and far from the next update, so timed steps are steady-state steps
    session = sparsify.apply(pruned, recipe, optimizer=pruned_opt,
                             steps_per_epoch=args.steps_per_epoch, start_epoch=1.01)

    def cycle(n):
        return [batch[i % len(batch)] for i in range(n)]

    timed_steps(plain, plain_opt, None, cycle(args.warmup), device)
    timed_steps(pruned, pruned_opt, session, cycle(args.warmup), device)
    plain_times, session_times, step_calls = [], [], []
    for _ in range(args.rounds):
        # alternate single steps, swapping which goes first: load drift on a shared machine and
        # any cost of running second (caches, allocator) hit both loops alike
        for i, x_y in enumerate(cycle(args.steps)):
            order = [0, 1] if i % 2 == 0 else [1, 0]
            for which in order:
                if which == 0:
                    plain_times += timed_steps(plain, plain_opt, None, [x_y], device)
                else:
                    session_times += timed_steps(pruned, pruned_opt, session, [x_y], device, step_calls)

    # one full mask update, as it happens every update_frequency epochs: advance the schedule
    # (without training) to just before the next update, then time the step() that makes it
    prune = next(m for m in session.modifiers if type(m).__name__ == "MagnitudePruning")
    while session.epoch + 1.0 / args.steps_per_epoch < prune.next_update_ - 1e-9:
        session.step()
    sync(device)
    start = time.perf_counter()
    session.step()
    sync(device)
    update = time.perf_counter() - start

    p, s = statistics.median(plain_times), statistics.median(session_times)
    steps_between = prune.update_frequency * args.steps_per_epoch
    result = {
        "model": args.model,
        "device": device,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "timed_steps_each": len(plain_times),
        "plain_ms": round(p * 1e3, 2),
        "session_ms": round(s * 1e3, 2),
        "ratio": round(s / p, 4),
        "session_step_call_ms": round(statistics.median(step_calls) * 1e3, 2),
        "mask_update_ms": round(update * 1e3, 2),
        "ratio_with_updates": round((s + update / steps_between) / p, 4),
        "masked_params": len(session.masks),
        "sparsity_at_start": round(min(session.sparsity().values()), 4),
    }
    print(f"plain step    median {result['plain_ms']:.1f} ms over {len(plain_times)} steps")
    print(f"session step  median {result['session_ms']:.1f} ms  ratio {result['ratio']:.3f}  (goal <= 1.10)")
    print(f"session.step() alone: median {result['session_step_call_ms']:.1f} ms (masks on weights)")
    print(f"mask update   {result['mask_update_ms']:.1f} ms, every {steps_between:g} steps: "
          f"ratio with updates {result['ratio_with_updates']:.3f}")
    if args.json:
        from sparsify.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
