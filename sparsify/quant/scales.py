"""Scale and zero-point math, fake quantization, and calibration thresholds (pure functions).

Conventions used everywhere in sparsify:

* weights: int8, symmetric, zero-point 0, grid [-127, 127] (-128 unused so the grid is
  symmetric), one scale per output channel (axis 0 of the torch weight);
* activations: uint8, asymmetric, one scale and zero-point per tensor; the range always contains
  0 so that zero padding and ReLU zeros are exact.

A pruned weight (exactly 0) stays exactly 0 on the grid because the zero-point is 0. The converse
also holds here: a nonzero weight whose magnitude is below half a step is moved to +-1 step
instead of rounding to 0, so the zero count of an exported INT8 layer equals the checkpoint's.
"""

from __future__ import annotations

import numpy as np
import torch

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
ACT_QMIN, ACT_QMAX = 0, 255
# a scale below this is treated as "all zeros" (a fully pruned channel)
_TINY = 1e-12


def weight_scales(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 scales, one per output channel (axis 0): max|w| / 127.

    A channel that is entirely zero (pruned away) keeps its weights at 0 with any scale; it
    gets the median scale of the other channels, because the ONNX bias of that channel is stored
    as int32 in steps of input_scale * weight_scale and must stay precise (with a scale of 1 a
    constant-output channel was off by a whole activation step). With ``per_channel=False``
    one scale is computed and repeated for every channel, so callers (and the ONNX rewrite)
    always see one scale per channel.
    """
    w = w.detach()
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    else:
        amax = w.abs().amax().expand(w.shape[0]).clone()
    scale = amax.float() / WEIGHT_QMAX
    live = scale > _TINY
    if bool(live.all()):
        return scale
    fill = scale[live].median() if bool(live.any()) else torch.tensor(1.0, device=scale.device)
    return torch.where(live, scale, fill)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer weights (as int8) on the symmetric grid, keeping the zero pattern exactly."""
    s = scale.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype)
    q = torch.clamp(torch.round(w.detach() / s), WEIGHT_QMIN, WEIGHT_QMAX)
    # a tiny nonzero weight must not become a new zero: the sparsity pattern is part of the model
    q = torch.where((q == 0) & (w != 0), torch.sign(w.detach()), q)
    return q.to(torch.int8)


def round_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` moved onto its int8 grid and dequantized (FP32 values that INT8 represents exactly)."""
    s = scale.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype)
    return quantize_weight(w, scale).to(w.dtype) * s


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric fake quantization with a straight-through gradient."""
    zp = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    out = torch.fake_quantize_per_channel_affine(
        w, scale.to(w.device, torch.float32), zp, 0, WEIGHT_QMIN, WEIGHT_QMAX
    )
    # same zero-preserving rule as quantize_weight; the correction is a constant, so the
    # gradient is still the straight-through one
    s = scale.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype)
    fix = ((out == 0) & (w != 0)).to(w.dtype) * torch.sign(w.detach()) * s
    return out + fix.detach()


def act_qparams(lo: float, hi: float, symmetric: bool = False) -> tuple[float, int]:
    """uint8 (scale, zero_point) for values in [lo, hi]; the range is widened to contain 0.

    ``symmetric`` uses [-t, t] with zero-point 128 (still uint8, the fast onnxruntime path).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        t = max(-lo, hi)
        scale = 2.0 * t / (ACT_QMAX - ACT_QMIN)
        return (scale if scale > _TINY else 1.0), 128
    scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    if scale <= _TINY:
        return 1.0, 0
    zp = int(np.clip(round(-lo / scale), ACT_QMIN, ACT_QMAX))
    return float(np.float32(scale)), zp


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per-tensor uint8 fake quantization with a straight-through gradient (tensor qparams)."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)


# ---- calibration thresholds ---------------------------------------------------------------


def percentile_range(
    hist: np.ndarray, lo: float, hi: float, percentile: float
) -> tuple[float, float]:
    """Range keeping ``percentile`` % of a histogram over [lo, hi]: (100 - percentile) % of
    the mass is clipped at the top, and at the bottom too when the data is signed (lo < 0)."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    total = hist.sum()
    if total == 0:
        return lo, hi
    edges = np.linspace(lo, hi, len(hist) + 1)
    cdf = np.cumsum(hist) / total
    tail = 1.0 - percentile / 100.0
    new_hi = edges[min(np.searchsorted(cdf, 1.0 - tail) + 1, len(hist))]
    if lo >= 0:
        return float(lo), float(new_hi)
    new_lo = edges[np.searchsorted(cdf, tail, side="right")]
    return float(min(new_lo, 0.0)), float(new_hi)


def _kl_threshold_bin(hist: np.ndarray, num_levels: int) -> int:
    """Number of histogram bins (from 0) whose clipping minimizes KL(P || Q), TensorRT-style.

    P is the histogram cut at bin i with the clipped tail added to its last bin; Q is P quantized
    into ``num_levels`` levels, each level's mass spread evenly over the bins of P it covers that
    were nonzero (empty bins stay empty, which keeps KL finite).
    """
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= num_levels:
        return n
    cum_tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # cum_tail[i] = sum(hist[i:])
    best_i, best_kl = n, np.inf
    for i in range(num_levels, n + 1):
        p = hist[:i].copy()
        p[i - 1] += cum_tail[i]
        # level boundaries over the first i bins
        bounds = (np.arange(num_levels + 1) * i) // num_levels
        nonzero = (hist[:i] != 0).astype(np.float64)
        level_mass = np.add.reduceat(hist[:i], bounds[:-1])
        level_nz = np.add.reduceat(nonzero, bounds[:-1])
        per_bin = np.where(level_nz > 0, level_mass / np.maximum(level_nz, 1), 0.0)
        q = np.repeat(per_bin, np.diff(bounds)) * nonzero
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p /= ps
        q /= qs
        mask = p > 0
        # the clipped tail lands in the last bin where Q may be empty: smooth instead of inf
        qm = np.maximum(q[mask], 1e-12)
        kl = float(np.sum(p[mask] * np.log(p[mask] / qm)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def entropy_range(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """KL-divergence threshold search on a histogram over [lo, hi] (see docs/quantization.md).

    One-sided data (lo >= 0, e.g. after ReLU) searches an upper threshold with 255 uint8 levels.
    Signed data searches each side from 0 on its own (upper on [0, hi], lower on [lo, 0]), with
    the 255 levels shared in proportion to each side's width: an asymmetric range such as a
    normalized image ([-0.42, 2.8] for MNIST) keeps its short side, which a symmetric |x|
    search would clip along with a spike of background pixels.
    """
    if hist.sum() == 0 or hi <= lo:
        return lo, hi
    n = len(hist)
    width = (hi - lo) / n
    levels = ACT_QMAX - ACT_QMIN
    if lo >= 0:
        i = _kl_threshold_bin(hist, levels)
        return lo, float(min(lo + (i + 0.5) * width, hi))
    k = int(np.clip(round(-lo / width), 0, n))  # bins below 0
    up_levels = int(np.clip(round(levels * hi / (hi - lo)), 1, levels - 1))
    new_hi, new_lo = hi, lo
    if k < n:
        i = _kl_threshold_bin(hist[k:], up_levels)
        new_hi = min((i + 0.5) * width, hi) if i < n - k else hi
    if k > 0:
        j = _kl_threshold_bin(hist[:k][::-1], levels - up_levels)
        new_lo = max(-(j + 0.5) * width, lo) if j < k else lo
    return float(new_lo), float(new_hi)
