"""Prune inside your own training loop: the four calls sparsify needs.

    recipe = sparsify.load_recipe("recipe.yaml")             # 1. a validated recipe
    session = sparsify.apply(model, recipe, optimizer=opt,    # 2. masks, LR, schedules
                             steps_per_epoch=len(loader))
    ...   loss.backward(); opt.step(); session.step()          # 3. after every optimizer step
    model = session.finalize()                                # 4. plain weights, exact zeros

Everything else (data, model, optimizer, logging, mixed precision, ...) stays yours. This script
trains a small LeNet on MNIST-5k for a few epochs (so it has something trained to prune), then
prunes it to 80% with a recipe written inline, in a loop written out by hand. Run it with

    .venv/bin/python scripts/custom_loop.py [--recipe my_recipe.yaml] [--out pruned.pt]

It finishes in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import sparsify
from sparsify.checkpoint import save_checkpoint
from sparsify.data import load_dataset
from sparsify.models import create_model

# Prune every Conv2d and Linear weight except the first conv to 80% over 3 epochs (cubic
# schedule, masks recomputed every half epoch), then one epoch of recovery at a low LR.
RECIPE = """
modifiers:
  - type: MagnitudePruning
    params: [Conv2d, Linear]
    ignore: ["features.0"]
    init_sparsity: 0.0
    final_sparsity: 0.8
    start_epoch: 0
    end_epoch: 3
    update_frequency: 0.5
  - type: LearningRateFunction
    lr_func: cosine
    init_lr: 0.02
    final_lr: 0.001
    start_epoch: 0
    end_epoch: 4
"""


def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=RECIPE, help="recipe file (default: the one above)")
    parser.add_argument("--out", default=None, help="save the pruned state_dict here")
    args = parser.parse_args()
    torch.manual_seed(0)

    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    loader = DataLoader(train, batch_size=64, shuffle=True)
    val_loader = DataLoader(val, batch_size=500)
    model = create_model("lenet", num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    # a quick dense model to start from (in practice: load your trained checkpoint); after only
    # two epochs it is still improving, so fine-tuning can end above its accuracy
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    print(f"dense:  top-1 {accuracy(model, val_loader):.2f}%")

    # 1-2: the recipe and the session; the session adjusts the optimizer's LR itself
    recipe = sparsify.load_recipe(args.recipe)
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=len(loader))

    for epoch in range(math.ceil(recipe.end_epoch)):
        for x, y in loader:
            logits = model(x)
            # session.loss lets loss-changing modifiers (distillation) add their term
            loss = session.loss(F.cross_entropy(logits, y), inputs=x, outputs=logits)
            opt.zero_grad()
            loss.backward()  # gradients of pruned weights arrive already masked
            opt.step()
            session.step()  # 3: re-applies masks, advances schedules and the LR
        sparsity = session.sparsity()
        mean = sum(sparsity.values()) / len(sparsity)
        print(f"epoch {epoch + 1}: mean sparsity {100 * mean:.1f}%, "
              f"top-1 {accuracy(model, val_loader):.2f}%")

    model = session.finalize()  # 4: hooks removed, pruned weights are exact zeros
    for name, value in session.sparsity().items():
        print(f"  {name:<24} {100 * value:6.2f}% zeros")
    print(f"pruned: top-1 {accuracy(model, val_loader):.2f}%")
    if args.out:
        save_checkpoint(args.out, model.state_dict())
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
