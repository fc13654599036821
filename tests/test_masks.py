"""Mask selection: exact counts, block shapes, N:M groups, channels, global thresholds."""

import pytest
import torch

from sparsify import masks as M


def weight(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_parse_spellings():
    assert M.parse_mask_type("unstructured").kind == "unstructured"
    assert M.parse_mask_type("block4") == M.MaskType("block", 1, 4)
    assert M.parse_mask_type([1, 4]) == M.parse_mask_type("1x4") == M.parse_mask_type("block")
    assert M.parse_mask_type("4x1") == M.MaskType("block", 4, 1)
    assert M.parse_mask_type("2:4") == M.MaskType("nm", n=2, m=4)
    assert M.parse_mask_type("4:8", "output") == M.MaskType("nm", n=4, m=8, dim="output")
    assert M.parse_mask_type("channel").kind == "channel"
    for bad in ("3x", "4:2", [1, 0], [1, 2, 3], 4, "dense"):
        with pytest.raises(ValueError):
            M.parse_mask_type(bad)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_unstructured_count_is_exact_even_with_ties(sparsity):
    w = weight(7, 5, 3, 3)
    w[:3] = 0.25  # many equal magnitudes: a float threshold would over- or under-shoot
    keep = M.layer_mask(w, sparsity, M.MaskType("unstructured"))
    assert int((~keep).sum()) == round(sparsity * w.numel())
    kept, dropped = w.abs()[keep], w.abs()[~keep]
    if dropped.numel() and kept.numel():
        assert dropped.max() <= kept.min()


def blocks_uniform(keep, rows, cols):
    """Every [rows along O] x [cols along I] block at each kernel position is all-kept or all-pruned."""
    o, i = keep.shape[:2]
    k = keep.reshape(o, i, -1).permute(2, 0, 1)  # [K, O, I]
    k = k[:, : o - o % rows, : i - i % cols].reshape(k.shape[0], o // rows, rows, i // cols, cols)
    s = k.sum(dim=(2, 4))
    return bool(((s == 0) | (s == rows * cols)).all())


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (12, 32)])
@pytest.mark.parametrize("rows,cols", [(1, 4), (4, 1), (2, 2)])
def test_block_masks_prune_whole_blocks(shape, rows, cols):
    w = weight(*shape)
    keep = M.layer_mask(w, 0.75, M.MaskType("block", rows, cols))
    assert blocks_uniform(keep, rows, cols)
    assert (~keep).float().mean().item() == pytest.approx(0.75, abs=1e-6)
    pruned = w * keep
    assert (pruned[~keep] == 0).all()


def test_1x4_runs_along_input_channels():
    w = torch.ones(2, 8, 1, 1)
    w[0, 4:8] = 0.01  # the weakest 1x4 block is output 0, inputs 4..7
    keep = M.layer_mask(w, 0.25, M.MaskType("block", 1, 4))
    assert not keep[0, 4:8].any() and keep[0, :4].all() and keep[1].all()


def test_block_l2_score_differs_from_l1():
    w = torch.tensor([[3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])  # L1 4 vs 4; L2 9 vs 4
    assert M.layer_mask(w, 0.5, M.MaskType("block", 1, 4), score="l2")[0, 4:].sum() == 0


def test_block_mask_with_padding():
    w = weight(5, 6)  # neither dimension divisible by 4
    keep = M.layer_mask(w, 0.5, M.MaskType("block", 4, 4))
    assert keep.shape == w.shape


@pytest.mark.parametrize("n,m,dim", [(2, 4, "input"), (4, 8, "input"), (2, 4, "output")])
def test_nm_groups_hold_at_most_n_nonzeros(n, m, dim):
    w = weight(16, 16, 3, 3)
    mt = M.MaskType("nm", n=n, m=m, dim=dim)
    keep = M.layer_mask(w, mt.max_sparsity, mt)
    groups = keep.permute(0, 2, 3, 1) if dim == "input" else keep.permute(1, 2, 3, 0)
    counts = groups.reshape(-1, m).sum(-1)
    assert (counts == n).all()
    # the kept ones are the largest of their group
    wg = (w.permute(0, 2, 3, 1) if dim == "input" else w.permute(1, 2, 3, 0)).reshape(-1, m).abs()
    kg = groups.reshape(-1, m)
    dropped_max = wg.masked_fill(kg, 0.0).max(-1).values
    kept_min = wg.masked_fill(~kg, float("inf")).min(-1).values
    assert (dropped_max <= kept_min).all()


def test_gradual_nm_never_exceeds_group_limit():
    w = weight(8, 16)
    mt = M.MaskType("nm", n=2, m=4)
    keep = M.layer_mask(w, 0.3, mt)
    assert int((~keep).sum()) == round(0.3 * w.numel())
    assert (keep.reshape(-1, 4).sum(-1) >= 2).all()


def test_channel_mask_prunes_whole_output_channels():
    w = weight(10, 4, 3, 3)
    w[3] *= 0.01
    keep = M.layer_mask(w, 0.3, M.MaskType("channel"))
    per_channel = keep.reshape(10, -1)
    assert ((per_channel.all(1)) | (~per_channel).all(1)).all()
    assert int((~per_channel.all(1)).sum()) == 3 and not keep[3].any()


def test_global_threshold_spans_layers():
    small, large = weight(8, 8) * 0.01, weight(8, 8, seed=1).abs() + 0.1
    masks = M.global_masks({"a": small, "b": large}, 0.5, M.MaskType("unstructured"))
    assert not masks["a"].any()  # every small weight goes before any large one
    assert int((~masks["a"]).sum() + (~masks["b"]).sum()) == 64
    with pytest.raises(ValueError):
        M.global_masks({"a": small}, 0.5, M.MaskType("nm", n=2, m=4))


def test_global_block_masks():
    masks = M.global_masks({"a": weight(8, 8), "b": weight(4, 16, seed=2)}, 0.5, M.MaskType("block", 1, 4))
    assert all(blocks_uniform(k, 1, 4) for k in masks.values())
    assert sum(int((~k).sum()) for k in masks.values()) == 64


def test_check_shape():
    assert M.check_shape(torch.Size([8, 6]), M.MaskType("nm", n=2, m=4)) is not None
    assert M.check_shape(torch.Size([8, 8]), M.MaskType("nm", n=2, m=4)) is None
    assert M.check_shape(torch.Size([8]), M.MaskType("unstructured")) is not None


def test_lowest_matches_a_stable_sort_with_ties():
    scores = torch.randint(0, 5, (200,)).float()
    for count in (0, 1, 37, 100, 199, 200):
        expected = torch.ones(200, dtype=torch.bool)
        expected[torch.argsort(scores, stable=True)[:count]] = False
        assert torch.equal(M.lowest(scores, count), expected)
