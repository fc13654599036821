"""Activation observer + fake-quant module (uint8, per tensor).

One small stateful module per quantized activation. It has three switches, set by the
QuantizationModifier's schedule or by calibration:

* ``observing``: update the running range (EMA during QAT; plain min/max during calibration);
* ``quantizing``: apply fake quantization with the current scale/zero-point;
* ``collect_hist``: accumulate a histogram over a fixed range (calibration's second pass).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsify.quant import scales

HIST_BINS = 2048


class ActQuant(nn.Module):
    """Observes one activation tensor and fake-quantizes it to uint8."""

    def __init__(self, symmetric: bool = False, momentum: float = 0.01, act: str | None = None):
        super().__init__()
        self.symmetric = symmetric
        # "relu"/"relu6": the observed tensor is the input of that activation; ranges are taken
        # of the activated values, so fake quantization also applies the activation
        self.act = act
        # EMA weight of a new batch during QAT (the first batch initializes the range)
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observing = True
        self.quantizing = True
        self.ema = True
        self.hist: np.ndarray | None = None
        self.hist_range: tuple[float, float] | None = None

    @property
    def initialized(self) -> bool:
        return bool(torch.isfinite(self.min_val)) and bool(torch.isfinite(self.max_val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # QAT (EMA) observes training batches only; calibration (plain min/max) observes all
        if self.observing and (self.training or not self.ema):
            self._observe(self._activated(x.detach()))
        if self.hist_range is not None:
            self._collect(self._activated(x.detach()))
        if self.quantizing and self.initialized:
            return scales.fake_quant_act(x, self.scale, self.zero_point)
        return x

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: observe/fake-quantize another module's output (a bound method, so a
        deep copy of the model hooks the copied observer)."""
        return self(output) if isinstance(output, torch.Tensor) else None

    def _activated(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "relu":
            return x.clamp(min=0)
        if self.act == "relu6":
            return x.clamp(0, 6)
        return x

    def _observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = x.min().float(), x.max().float()
        if self.ema and self.initialized:
            lo = self.min_val + self.momentum * (lo - self.min_val)
            hi = self.max_val + self.momentum * (hi - self.max_val)
        elif self.initialized:
            lo, hi = torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.set_range(float(lo), float(hi))

    def set_range(self, lo: float, hi: float) -> None:
        scale, zp = scales.act_qparams(lo, hi, self.symmetric)
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)

    def start_histogram(self) -> None:
        """Fix the histogram range to the observed [min, max] (taken with 0 included)."""
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        if hi <= lo:
            hi = lo + 1e-6
        self.hist_range = (lo, hi)
        self.hist = np.zeros(HIST_BINS, dtype=np.float64)

    def _collect(self, x: torch.Tensor) -> None:
        lo, hi = self.hist_range
        # exact zeros (ReLU, padding) are exact at any threshold: counting them would put a
        # spike in the first bin that drags the KL search towards whatever threshold keeps
        # that bin alone in its level
        x = x.float().flatten()
        x = x[x != 0]
        # clamp: histc drops values outside the range, they belong in the edge bins
        h = torch.histc(x.clamp(lo, hi), bins=HIST_BINS, min=lo, max=hi)
        self.hist += h.cpu().double().numpy()

    def stop_histogram(self) -> None:
        self.hist_range = None
        self.hist = None

    def extra_repr(self) -> str:
        return (
            f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, "
            f"observing={self.observing}, quantizing={self.quantizing}"
        )
