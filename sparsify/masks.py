"""Which weights to zero for a target sparsity: pure functions from weights to bool keep-masks.

Layout conventions (weights of Linear [O, I] and Conv [O, I, kh, kw]; K = kh * kw):
- block [r, c]: r consecutive output channels x c consecutive input channels at one kernel
  position. [1, 4] ("block4", "1x4") is the VNNI dot-product shape: 4 input channels of one output
  channel. [4, 1] is 4 output channels at one input channel. Dimensions that do not divide are
  padded with zeros for scoring; padding never appears in the mask.
- N:M: at most N nonzeros in every group of M consecutive weights along the input channels (or
  the output channels with ``dim="output"``) at one kernel position.
- channel: whole output channels (filters).

Selection is by count, not by a float threshold: exactly round(sparsity * groups) groups are
zeroed, ties broken by position, so the sparsity is exact to within one group (one element for
unstructured masks) however many weights share a magnitude (e.g. the zeros of earlier updates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaskType:
    kind: str  # "unstructured" | "block" | "nm" | "channel"
    rows: int = 1  # block: consecutive output channels
    cols: int = 1  # block: consecutive input channels
    n: int = 0  # N:M: kept per group
    m: int = 0  # N:M: group size
    dim: str = "input"  # N:M: "input" or "output"

    @property
    def max_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.kind == "nm" else 1.0

    def __str__(self) -> str:
        if self.kind == "block":
            return f"[{self.rows}, {self.cols}]"
        if self.kind == "nm":
            return f"{self.n}:{self.m}" + (" along output channels" if self.dim == "output" else "")
        return self.kind


def parse_mask_type(value: object, nm_dim: str = "input") -> MaskType:
    """Parse the recipe spellings: unstructured, block4 / 1x4 / [1, 4], 4x1 / [4, 1], [r, c],
    "N:M", channel / filter. Raises ValueError with the accepted spellings."""
    accepted = "unstructured, block4, 1x4, 4x1, [r, c], N:M (e.g. '2:4'), channel"
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"mask_type {value!r} must be two positive integers [rows, cols]")
        rows, cols = value
        if rows < 1 or cols < 1:
            raise ValueError(f"mask_type {value!r} must be two positive integers [rows, cols]")
        return MaskType("unstructured") if rows == cols == 1 else MaskType("block", rows, cols)
    if not isinstance(value, str):
        raise ValueError(f"mask_type {value!r} is not one of: {accepted}")
    text = value.strip().lower()
    if text == "unstructured":
        return MaskType("unstructured")
    if text in ("block", "block4"):
        return MaskType("block", 1, 4)
    if text in ("channel", "filter"):
        return MaskType("channel")
    if match := re.fullmatch(r"(\d+)x(\d+)", text):
        return parse_mask_type([int(match[1]), int(match[2])])
    if match := re.fullmatch(r"(\d+):(\d+)", text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"mask_type {value!r}: N:M needs 0 < N < M (e.g. '2:4')")
        if nm_dim not in ("input", "output"):
            raise ValueError(f"nm_dim {nm_dim!r} must be 'input' or 'output'")
        return MaskType("nm", n=n, m=m, dim=nm_dim)
    raise ValueError(f"mask_type {value!r} is not one of: {accepted}")


def check_shape(weight_shape: torch.Size, mask_type: MaskType) -> str | None:
    """Why ``mask_type`` cannot apply to a weight of this shape, or None if it can."""
    if len(weight_shape) < 2:
        return f"mask_type {mask_type} needs a weight with at least 2 dimensions"
    if mask_type.kind == "nm":
        size = weight_shape[1] if mask_type.dim == "input" else weight_shape[0]
        if size % mask_type.m:
            return f"mask_type {mask_type}: {mask_type.dim} channels ({size}) are not a multiple of {mask_type.m}"
    return None


def _as_okc(weight: torch.Tensor) -> torch.Tensor:
    """View a weight as [O, I, K] (K = kernel positions; 1 for Linear)."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def _block_groups(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[K, O/r, I/c, r*c]: each block's weights on the last axis (zero-padded)."""
    w = _as_okc(weight).permute(2, 0, 1)  # [K, O, I]
    k, o, i = w.shape
    w = F.pad(w, (0, -i % cols, 0, -o % rows))
    ob, ib = w.shape[1] // rows, w.shape[2] // cols
    return w.reshape(k, ob, rows, ib, cols).permute(0, 1, 3, 2, 4).reshape(k, ob, ib, rows * cols)


def _block_expand(keep: torch.Tensor, shape: torch.Size, rows: int, cols: int) -> torch.Tensor:
    """Inverse of _block_groups for a [K, O/r, I/c] group mask -> mask of ``shape``."""
    k, ob, ib = keep.shape
    full = keep[..., None].expand(k, ob, ib, rows * cols).reshape(k, ob, ib, rows, cols)
    full = full.permute(0, 1, 3, 2, 4).reshape(k, ob * rows, ib * cols)[:, : shape[0], : shape[1]]
    return full.permute(1, 2, 0).reshape(shape)


def group_scores(weight: torch.Tensor, mask_type: MaskType, score: str = "l1") -> torch.Tensor:
    """One score per prunable group (flat): |w| for unstructured, the L1 or L2 norm of each
    block or output channel. Not defined for N:M (see nm_mask)."""
    w = weight.detach().float()
    if mask_type.kind == "unstructured":
        return w.abs().flatten()
    if mask_type.kind == "block":
        groups = _block_groups(w, mask_type.rows, mask_type.cols)
    elif mask_type.kind == "channel":
        groups = w.reshape(w.shape[0], -1)
    else:
        raise ValueError(f"group_scores does not handle mask_type {mask_type}")
    # squared L2 ranks groups like L2 and saves a sqrt
    return (groups.abs().sum(-1) if score == "l1" else groups.square().sum(-1)).flatten()


def expand_groups(keep: torch.Tensor, weight_shape: torch.Size, mask_type: MaskType) -> torch.Tensor:
    """Turn a flat per-group keep vector (from group_scores order) into a weight-shaped mask."""
    if mask_type.kind == "unstructured":
        return keep.reshape(weight_shape)
    if mask_type.kind == "channel":
        return keep.reshape(-1, *([1] * (len(weight_shape) - 1))).expand(weight_shape).clone()
    o, i = weight_shape[0], weight_shape[1]
    k = _as_okc(torch.empty(weight_shape, device="meta")).shape[2]
    grid = keep.reshape(k, -(-o // mask_type.rows), -(-i // mask_type.cols))
    return _block_expand(grid, weight_shape, mask_type.rows, mask_type.cols)


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask over a flat score vector that drops exactly ``count`` lowest scores; among equal
    scores the earlier position is dropped first. kthvalue + one pass: a full sort of a large
    layer costs ~10x more."""
    n = scores.numel()
    if count <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if count >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, count).values
    below = scores < kth
    ties = scores == kth
    needed = count - int(below.sum())
    return ~(below | (ties & (torch.cumsum(ties, 0) <= needed)))


def prune_count(sparsity: float, total: int) -> int:
    return min(total, max(0, round(sparsity * total)))


def _rank_in_group(groups: torch.Tensor) -> torch.Tensor:
    """Ascending rank of each entry within its row (ties: earlier column first), by pairwise
    comparison: M is small (4, 8), and this beats two argsorts over millions of rows."""
    m = groups.shape[1]
    a, b = groups[:, :, None], groups[:, None, :]  # entry i vs entry j
    earlier = torch.ones(m, m, dtype=torch.bool, device=groups.device).tril(-1)  # j < i
    return ((b < a) | ((b == a) & earlier)).sum(-1)


def nm_mask(weight: torch.Tensor, mask_type: MaskType, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing round(sparsity * numel) weights, never more than M - N per group of M.

    Gradual N:M: inside each group only the M - N smallest weights are candidates; the smallest
    candidates overall go first, so at sparsity 1 - N/M every group holds exactly N nonzeros.
    """
    w = _as_okc(weight.detach().float())
    if mask_type.dim == "output":
        w = w.transpose(0, 1)  # [I, O, K]
    a, b, k = w.shape
    groups = w.permute(0, 2, 1).reshape(-1, mask_type.m).abs()  # rows of M along the grouped axis
    rank = _rank_in_group(groups)
    candidate = rank < (mask_type.m - mask_type.n)
    scores = groups.masked_fill(~candidate, float("inf")).flatten()
    count = min(prune_count(sparsity, scores.numel()), int(candidate.sum()))
    keep = lowest(scores, count).reshape(a, k, b).permute(0, 2, 1)
    if mask_type.dim == "output":
        keep = keep.transpose(0, 1)
    return keep.reshape(weight.shape)


def layer_mask(weight: torch.Tensor, sparsity: float, mask_type: MaskType, score: str = "l1") -> torch.Tensor:
    """Keep-mask for one weight at ``sparsity`` (a per-layer threshold)."""
    if mask_type.kind == "nm":
        return nm_mask(weight, mask_type, sparsity)
    scores = group_scores(weight, mask_type, score)
    keep = lowest(scores, prune_count(sparsity, scores.numel()))
    return expand_groups(keep, weight.shape, mask_type).to(weight.device)


def global_masks(
    weights: dict[str, torch.Tensor], sparsity: float, mask_type: MaskType, score: str = "l1"
) -> dict[str, torch.Tensor]:
    """Keep-masks with one threshold across all ``weights``: round(sparsity * all groups) of the
    lowest-scoring groups are zeroed wherever they are."""
    if mask_type.kind not in ("unstructured", "block"):
        raise ValueError(f"global pruning supports unstructured and block masks, not {mask_type}")
    scores = {name: group_scores(w, mask_type, score) for name, w in weights.items()}
    flat = torch.cat([s.cpu() for s in scores.values()])
    keep = lowest(flat, prune_count(sparsity, flat.numel()))
    masks, offset = {}, 0
    for name, s in scores.items():
        part = keep[offset : offset + s.numel()]
        offset += s.numel()
        masks[name] = expand_groups(part, weights[name].shape, mask_type).to(weights[name].device)
    return masks


def sparsity(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((tensor == 0).sum()) / max(1, tensor.numel())
