"""The built-in fine-tuning loop: a recipe applied to a trained checkpoint on a shipped task.

``finetune(recipe, checkpoint, TrainConfig(...))`` is what ``sparsify apply`` runs:

- loads the checkpoint into ``create_model(config.model)`` (sized for ``config.data``);
- builds the optimizer (SGD with momentum by default) and applies the recipe session;
- trains until the recipe's end epoch (or ``config.epochs``), evaluating on the validation split
  after every epoch;
- after every epoch writes ``checkpoints/epoch_<n>.pt`` (model, optimizer, session, RNG state
  and metrics, atomically) and ``metrics.jsonl``; at the end ``model.pt`` (finalized: plain
  weights with exact zeros) and ``sparsity.json``.

Resume (``resume=True``) restarts from the newest epoch checkpoint. The order of the training
data is a function of (seed, epoch) alone and the RNG state is saved with each checkpoint, so a
run killed at any point and resumed ends with the same weights and masks as one never stopped.

Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA), each rank trains on its shard of every epoch, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler
from tqdm.auto import tqdm

from sparsify.checkpoint import load_checkpoint, load_into, load_object, save_checkpoint, save_object
from sparsify.data import load_dataset
from sparsify.errors import CheckpointError, InputError
from sparsify.fileio import atomic_write_text
from sparsify.models import create_model

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# settings that must match for a resumed run to continue the same run
_RESUME_KEYS = ("model", "data", "batch_size", "seed", "optimizer", "world_size", "epochs")
MAX_SEED = 2**32 - 1  # the range numpy's and every torch generator's seeds share


@dataclass
class TrainConfig:
    model: str
    data: str
    out: Path | None = None
    epochs: int | None = None  # None: the recipe's end epoch, rounded up
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # "sgd" or "adamw"
    seed: int = 0
    device: str = "cpu"
    keep_checkpoints: int = 2
    progress: bool = True
    eval_batch_size: int = 500

    def __post_init__(self):
        if self.out is not None:
            self.out = Path(self.out)
        for name in ("batch_size", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 0:
            raise InputError(f"epochs must be >= 0, got {self.epochs}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"learning rate (--lr) must be a finite number > 0, got {self.lr}")
        for flag, value in (("--momentum", self.momentum), ("--weight-decay", self.weight_decay)):
            if not math.isfinite(value) or value < 0:
                raise InputError(f"{flag} must be a finite number >= 0, got {value}")
        if self.optimizer not in ("sgd", "adamw"):
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose 'sgd' or 'adamw'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"--seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        _check_device(self.device)


def _check_device(device: str) -> None:
    """Refuse a --device torch cannot parse or this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {device!r} is not a device name; use cpu, cuda or "
                         f"cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine; use "
                             f"--device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"--device {device}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}; pick one of them")
    elif dev.type != "cpu":
        raise InputError(f"--device {device}: only cpu and cuda devices are supported; use cpu, "
                         f"cuda or cuda:N")


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # the session's, at the end
    sparsity: dict[str, dict] = field(default_factory=dict)
    overall_sparsity: float = 0.0
    model_path: Path | None = None
    metrics_path: Path | None = None
    sparsity_path: Path | None = None
    is_writer: bool = True  # False on ranks > 0 of a distributed run


# ---------------------------------------------------------------------------------------------
# distributed helpers: a no-op single process unless WORLD_SIZE > 1


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), torch.device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return _Dist(dist.get_rank(), dist.get_world_size(), owns), dev


def _sync_buffers(model: nn.Module, d: _Dist) -> None:
    # DDP broadcasts buffers at the start of each forward, so after the last batch every rank
    # holds rank 0's statistics updated by its own batch; rank 0's copy wins everywhere
    if d.world > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


# ---------------------------------------------------------------------------------------------
# batches, evaluation, RNG


def _batch(dataset: Dataset, indices: list[int], device: torch.device):
    if hasattr(dataset, "inputs") and hasattr(dataset, "labels"):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return dataset.inputs[idx].to(device), dataset.labels[idx].to(device)
    items = [dataset[i] for i in indices]
    return (torch.stack([x for x, _ in items]).to(device),
            torch.as_tensor([int(y) for _, y in items]).to(device))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 500,
             device: str | torch.device = "cpu", rank: int = 0, world: int = 1) -> dict:
    """Mean cross-entropy loss and top-1 accuracy (percent) of ``model`` on ``dataset``.

    With ``world > 1`` each rank scores a disjoint shard and the totals are summed across ranks.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    indices = list(range(rank, len(dataset), world))
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for start in range(0, len(indices), batch_size):
        x, y = _batch(dataset, indices[start:start + batch_size], device)
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum().double()
        totals[2] += len(y)
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    count = max(totals[2].item(), 1.0)
    return {"loss": totals[0].item() / count, "top1": 100.0 * totals[1].item() / count}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------
# one epoch


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
                 sampler: DistributedSampler, epoch: int, cfg: TrainConfig,
                 device: torch.device, session=None, lr_at=None, show: bool = True) -> float:
    """Train one epoch; returns the mean training loss of this rank's batches."""
    model.train()
    sampler.set_epoch(epoch)  # the data order depends only on (seed, epoch)
    order = list(sampler)
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    total, bar = 0.0, tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not show,
                           unit="batch")
    for i, indices in enumerate(bar):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + i / len(batches))
        x, y = _batch(dataset, indices, device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if session is not None:
            loss = session.loss(loss, inputs=x, outputs=logits, targets=y)
        loss.backward()
        optimizer.step()
        if session is not None:
            session.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return total / max(len(batches), 1)


def _steps_per_epoch(n: int, d: _Dist, batch_size: int) -> int:
    # DistributedSampler pads every shard up to ceil(n / world) samples
    return max(1, math.ceil(math.ceil(n / d.world) / batch_size))


# ---------------------------------------------------------------------------------------------
# dense baseline


def train_baseline(model_name: str, data_name: str, epochs: int, lr: float = 0.05,
                   batch_size: int = 64, optimizer: str = "sgd", weight_decay: float = 5e-4,
                   seed: int = 0, device: str = "cpu", progress: bool = True,
                   **model_kwargs) -> tuple[nn.Module, list[dict]]:
    """Train a dense ``model_name`` from scratch on ``data_name`` with a cosine learning rate.

    Returns the trained model (in eval mode) and one metrics dict per epoch. Single process.
    """
    cfg = TrainConfig(model=model_name, data=data_name, epochs=epochs, lr=lr,
                      batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                      seed=seed, device=device, progress=progress)
    torch.manual_seed(seed)
    train_ds, val_ds = load_dataset(data_name, "train"), load_dataset(data_name, "val")
    dev = torch.device(device)
    model = create_model(model_name, num_classes=train_ds.num_classes,
                         **{**train_ds.model_kwargs, **model_kwargs}).to(dev)
    opt = _make_optimizer(model, cfg)
    sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=seed)

    def lr_at(epoch: float) -> float:
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(epoch / max(epochs, 1), 1.0)))

    metrics = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, opt, train_ds, sampler, epoch, cfg, dev, lr_at=lr_at,
                                  show=progress)
        val = evaluate(model, val_ds, cfg.eval_batch_size, dev)
        metrics.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                        "val_top1": val["top1"], "time_s": time.perf_counter() - t0})
        log.info("baseline epoch %d: val top-1 %.2f%%", epoch + 1, val["top1"])
    return model.eval(), metrics


# ---------------------------------------------------------------------------------------------
# fine-tuning under a recipe


def epoch_checkpoints(out: Path) -> list[tuple[int, Path]]:
    folder = out / CHECKPOINT_DIR
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _EPOCH_FILE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def _resume_state(out: Path, cfg: dict) -> tuple[dict, Path]:
    found = epoch_checkpoints(out)
    if not found:
        raise CheckpointError(f"nothing to resume in {out}: no {CHECKPOINT_DIR}/epoch_<n>.pt "
                              f"files; run without --resume to start")
    epoch, path = found[-1]
    state = load_object(path)
    if not isinstance(state, dict) or not {"model", "optimizer", "session", "rng"} <= set(state):
        raise CheckpointError(f"{path} is not a sparsify training checkpoint")
    old = state.get("config", {})
    diff = [f"{k} {cfg[k]!r} (the run used {old.get(k)!r})"
            for k in _RESUME_KEYS if k in old and old[k] != cfg[k]]
    if diff:
        raise InputError(f"cannot resume the run in {out} with different settings: "
                         + "; ".join(diff) + ". Use the original settings or a new --out")
    log.info("resuming from %s (epoch %d)", path, epoch)
    return state, path


def _restore(state: dict, path: Path, model: nn.Module, optimizer, session) -> tuple[int, list]:
    """Load a saved epoch into the run; returns (epochs done, metrics so far)."""
    part = "session"
    try:
        session.load_state_dict(state["session"])
        # after the session: its start-up may have touched weights, LR and momentum
        part = "model"
        load_into(model, state["model"], path)
        part = "optimizer"
        optimizer.load_state_dict(state["optimizer"])
        part = "rng"
        _set_rng_state(state["rng"])
        part = "epoch"
        return int(state["epoch"]), list(state["metrics"])
    except CheckpointError as err:
        if str(path) in str(err):
            raise
        raise CheckpointError(f"cannot resume from {path}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        detail = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"cannot resume from {path}: its {part!r} state is damaged or not written by "
            f"sparsify ({type(err).__name__}: {detail}); delete the file to resume from an "
            f"earlier epoch, or start a new run with another --out") from None


def check_output_dir(out: Path) -> None:
    """Fail before any work when ``out`` (--out) cannot become a directory."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file; give a directory for the run's files")
        above = next((p for p in out.parents if p.exists()), None)  # nearest existing ancestor
    except OSError as err:  # e.g. a name too long for the file system
        raise InputError(f"--out {out} is not a usable path: {err.strerror or err}") from None
    if above is not None and not above.is_dir():
        raise InputError(f"--out {out}: {above} is a file, not a directory; choose another --out")


def _make_run_dirs(out: Path, created: list[Path]) -> None:
    """Create out/checkpoints, listing in ``created`` (top first) each folder this call makes."""
    folder = out / CHECKPOINT_DIR
    created += [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        at = f" ({err.filename})" if err.filename and str(err.filename) != str(out) else ""
        raise InputError(f"cannot create --out {out}: {err.strerror or err}{at}; choose a "
                         f"directory you can write to") from None


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders a failed run created, if nothing was written into them."""
    for path in reversed(created):
        try:
            path.rmdir()  # only ever removes an empty folder
        except OSError:
            pass


def layer_sparsity(model: nn.Module) -> dict[str, dict]:
    """Zeros per Conv/Linear weight: {param name: {sparsity, zeros, numel, shape}}."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            w = module.weight.detach()
            zeros = int((w == 0).sum())
            out[f"{name}.weight"] = {"sparsity": zeros / w.numel(), "zeros": zeros,
                                     "numel": w.numel(), "shape": list(w.shape)}
    return out


def finetune(recipe, checkpoint: str | os.PathLike, config: TrainConfig,
             resume: bool = False) -> TrainResult:
    """Fine-tune ``checkpoint`` under ``recipe`` (a Recipe, a path, or YAML text); see module doc."""
    from sparsify.recipe import Recipe, load_recipe
    from sparsify.session import apply

    cfg = config
    if cfg.out is None:
        raise InputError("fine-tuning needs an output directory (--out)")
    check_output_dir(cfg.out)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    end = rec.end_epoch if rec.end_epoch and rec.end_epoch > 0 else 0.0
    epochs = math.ceil(end - 1e-9) if cfg.epochs is None else cfg.epochs
    if epochs < end - 1e-9:
        raise InputError(f"--epochs {epochs} stops before the recipe ends (epoch {end:g}); "
                         f"pruning would not reach its final sparsity. Use --epochs "
                         f">= {math.ceil(end - 1e-9)} or leave it out")

    initial = load_checkpoint(checkpoint)  # fail fast, before any data is read

    d, device = _init_distributed(cfg.device)
    created: list[Path] = []  # folders this run made: removed again if it fails before writing
    try:
        run_cfg = {**asdict(cfg), "out": str(cfg.out), "epochs": epochs, "world_size": d.world}
        out = cfg.out
        if not resume and epoch_checkpoints(out):
            raise InputError(f"{out} already holds a run ({CHECKPOINT_DIR}/); pass --resume to "
                             f"continue it or choose another --out")
        state, state_path = _resume_state(out, run_cfg) if resume else (None, None)

        torch.manual_seed(cfg.seed)
        train_ds, val_ds = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "val")
        model = create_model(cfg.model, num_classes=train_ds.num_classes, **train_ds.model_kwargs)
        # a resumed run starts exactly like the original one (same checkpoint, same session
        # start), then every piece of state is overwritten with the saved one
        load_into(model, initial, checkpoint)
        model.to(device)
        optimizer = _make_optimizer(model, cfg)
        sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True,
                                     seed=cfg.seed)
        steps = _steps_per_epoch(len(train_ds), d, cfg.batch_size)
        session = apply(model, rec, optimizer=optimizer, steps_per_epoch=steps)
        start, metrics = 0, []
        if state:
            start, metrics = _restore(state, state_path, model, optimizer, session)
        # every input is checked: only now does the run create its folders
        if d.writer:
            _make_run_dirs(out, created)
        d.barrier()
        net = model
        if d.world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            train_loss = _train_epoch(net, optimizer, train_ds, sampler, epoch, cfg, device,
                                      session=session, show=cfg.progress and d.writer)
            _sync_buffers(model, d)
            if d.world > 1:  # every rank ran the same number of batches: average the means
                mean = torch.tensor([train_loss], dtype=torch.float64, device=device)
                dist.all_reduce(mean)
                train_loss = mean.item() / d.world
            val = evaluate(model, val_ds, cfg.eval_batch_size, device, d.rank, d.world)
            sparsity = session.sparsity()
            metrics.append({
                "epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                "val_top1": val["top1"], "lr": optimizer.param_groups[0]["lr"],
                "sparsity": (sum(sparsity.values()) / len(sparsity)) if sparsity else 0.0,
                "time_s": round(time.perf_counter() - t0, 3),
            })
            log.info("epoch %d/%d: val top-1 %.2f%%", epoch + 1, epochs, val["top1"])
            if d.writer:
                _write_epoch(out, epoch + 1, model, optimizer, session, metrics, run_cfg,
                             rec, cfg.keep_checkpoints)
            d.barrier()

        masks = {name: mask.detach().cpu().clone() for name, mask in session.masks.items()}
        model = session.finalize()
        result = TrainResult(model=model, metrics=metrics, masks=masks, is_writer=d.writer)
        result.sparsity = layer_sparsity(model)
        zeros = sum(v["zeros"] for v in result.sparsity.values())
        total = sum(v["numel"] for v in result.sparsity.values())
        result.overall_sparsity = zeros / total if total else 0.0
        if d.writer:
            _write_final(out, result, rec, cfg)
        d.barrier()
        return result
    except BaseException:
        _remove_empty(created)
        raise
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _write_epoch(out: Path, epoch: int, model, optimizer, session, metrics, run_cfg, rec,
                 keep: int) -> None:
    path = out / CHECKPOINT_DIR / f"epoch_{epoch}.pt"
    save_object(path, {
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "session": session.state_dict(), "rng": _rng_state(), "metrics": metrics,
        "config": run_cfg, "recipe": rec.text,
    })
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    for old_epoch, old in epoch_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)


def _write_final(out: Path, result: TrainResult, rec, cfg: TrainConfig) -> None:
    result.model_path = save_checkpoint(out / "model.pt", result.model.state_dict(), metadata={
        "model": cfg.model, "data": cfg.data, "recipe": rec.text})
    result.metrics_path = out / "metrics.jsonl"
    atomic_write_text(result.metrics_path,
                      "".join(json.dumps(m) + "\n" for m in result.metrics))
    result.sparsity_path = out / "sparsity.json"
    atomic_write_text(result.sparsity_path, json.dumps(
        {"overall": result.overall_sparsity, "layers": result.sparsity}, indent=2) + "\n")
