"""Post-training calibration: activation ranges from a few batches, no training."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable

import torch
from torch import nn

from sparsify.errors import InputError
from sparsify.quant import scales
from sparsify.quant.prepare import (
    QuantScheme, act_quants, prepare, quantization_state, set_observing, set_quantizing,
)

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")


def _run(model: nn.Module, batch: Any) -> None:
    # a Tensor is the input; a dict holds keyword inputs; a tuple/list is (inputs, labels, ...)
    # as DataLoaders yield it, so only its first element goes into the model
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0])
    else:
        raise InputError(f"calibration batch of type {type(batch).__name__} is not supported: "
                         f"give Tensors, dicts of Tensors or (input, label) tuples")


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, method: str = "minmax",
              num_batches: int | None = None, percentile: float = 99.99,
              scheme: QuantScheme | None = None, ignore: Iterable[str] = ()) -> dict:
    """Set every activation scale of ``model`` from ``batches``; returns quantization_state.

    Inserts fake quantization first when the model has none (``scheme``/``ignore`` apply then).
    ``minmax`` takes the observed range; ``percentile`` clips ``100 - percentile`` % of the
    values at each end; ``entropy`` picks the clipping threshold that minimizes the KL
    divergence between the FP32 and the quantized histograms. Observers are off afterwards
    (scales fixed) and fake quantization is on, so the model now simulates INT8.
    """
    if method not in METHODS:
        raise InputError(f"calibration method {method!r} is unknown; use one of {METHODS}")
    if getattr(model, "_sparsify_quant", None) is None:
        prepare(model, scheme or QuantScheme(), ignore=ignore)
    data = list(itertools.islice(iter(batches), num_batches))
    if not data:
        raise InputError("calibration needs at least one batch of input data")
    was_training = model.training
    model.eval()
    observers = act_quants(model)
    for aq in observers:
        aq.min_val.fill_(float("inf"))
        aq.max_val.fill_(float("-inf"))
        aq.ema = False
    set_observing(model, True)
    set_quantizing(model, False)
    try:
        for b in data:
            _run(model, b)
        set_observing(model, False)
        if method != "minmax":
            for aq in observers:
                if aq.initialized:
                    aq.start_histogram()
            for b in data:
                _run(model, b)
            for aq in observers:
                if aq.hist is None:
                    continue
                lo, hi = aq.hist_range
                if method == "percentile":
                    lo, hi = scales.percentile_range(aq.hist, lo, hi, percentile)
                else:
                    lo, hi = scales.entropy_range(aq.hist, lo, hi)
                aq.set_range(lo, hi)
                aq.stop_histogram()
    finally:
        for aq in observers:
            aq.stop_histogram()
            aq.ema = True
        set_quantizing(model, True)
        set_observing(model, False)
        model.train(was_training)
    missing = sum(not aq.initialized for aq in observers)
    if missing:
        log.warning("%d activation observers saw no data during calibration", missing)
    log.info("calibrated %d activations with %s on %d batches", len(observers), method, len(data))
    return quantization_state(model)
