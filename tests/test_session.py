"""The session in a user's loop: schedule per update, masks under momentum optimizers, LR
modifiers, finalize, resume bit-identically."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify.errors import CheckpointError, RecipeError
from sparsify.schedules import sparsity_at

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)


def train(model, opt, session, steps, first=0, check=None):
    for i in range(first, first + steps):
        x, y = batch(i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()
        if check:
            check(i)


PRUNE = """
modifiers:
  - type: MagnitudePruning
    params: [conv2, fc]
    init_sparsity: 0.1
    final_sparsity: 0.8
    start_epoch: 0.5
    end_epoch: 2.5
    update_frequency: 0.5
    inter_func: {func}
"""


@pytest.mark.parametrize("func", ["cubic", "linear", "inverse_cubic"])
def test_sparsity_at_each_update_equals_the_schedule(func):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    session = sparsify.apply(model, PRUNE.format(func=func), optimizer=opt, steps_per_epoch=4)
    assert session.sparsity() == {"conv2.weight": 0.0, "fc.weight": 0.0}
    seen = {}

    def check(i):
        epoch = session.epoch
        expected = sparsity_at(epoch, 0.5, 2.5, 0.1, 0.8, func) if epoch >= 0.5 else 0.0
        # updates land on 0.5, 1.0, ..., 2.5; between updates the last value holds
        if epoch >= 0.5 and abs(epoch * 2 - round(epoch * 2)) < 1e-9:
            for name, value in session.sparsity().items():
                numel = model.get_parameter(name).numel()
                assert abs(value * numel - expected * numel) <= 0.5 + 1e-6, (epoch, name)
            seen[epoch] = expected

    train(model, opt, session, 14, check=check)
    assert sorted(seen) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert session.sparsity()["fc.weight"] == pytest.approx(0.8, abs=1 / 160)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01),
])
def test_pruned_weights_stay_exactly_zero_under_momentum(make_opt):
    model = make()
    opt = make_opt(model.parameters())
    # a few dense steps first so momentum / moments are non-zero when pruning starts
    recipe = PRUNE.format(func="cubic").replace("start_epoch: 0.5", "start_epoch: 1.0")
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=3)

    before = {}  # masks in force during the backward of this step

    def check(i):
        for name, mask in session.masks.items():
            param = model.get_parameter(name)
            assert (param[~mask] == 0).all(), (i, name)
        for name, mask in before.items():
            assert (model.get_parameter(name).grad[~mask] == 0).all(), (i, name)
        before.clear()
        before.update(session.masks)

    train(model, opt, session, 12, check=check)
    model = session.finalize()
    assert session.sparsity()["conv2.weight"] == pytest.approx(0.8, abs=1 / 1152)
    for param in model.parameters():
        assert not param._backward_hooks


def test_finalize_removes_hooks_and_leaves_plain_zeros():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = sparsify.apply(model, "modifiers: [{type: MagnitudePruning, params: fc, final_sparsity: 0.5}]", optimizer=opt)
    zeros = model.fc.weight == 0
    assert int(zeros.sum()) == 80
    session.finalize()
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    assert (model.fc.weight.grad[zeros] != 0).any()  # gradients are no longer masked
    with pytest.raises(RuntimeError):
        session.step()


def test_leave_enabled_false_releases_masks_after_end():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe = "modifiers: [{type: MagnitudePruning, params: fc, final_sparsity: 0.5, end_epoch: 1, leave_enabled: false}]"
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=2)
    train(model, opt, session, 1)
    assert "fc.weight" in session.masks
    train(model, opt, session, 3, first=1)
    assert session.masks == {}
    assert session.sparsity()["fc.weight"] < 0.5


def test_constant_pruning_keeps_existing_zeros():
    model = make()
    with torch.no_grad():
        model.conv2.weight[:, :4] = 0
    zeros = model.conv2.weight == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    session = sparsify.apply(model, "modifiers: [{type: ConstantPruning, params: conv2}]", optimizer=opt)
    train(model, opt, session, 5)
    assert torch.equal(model.conv2.weight == 0, zeros)


def test_global_pruning_reaches_total_count():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = sparsify.apply(model, "modifiers: [{type: GlobalMagnitudePruning, params: [conv2, fc], final_sparsity: 0.7}]", optimizer=opt)
    total = model.conv2.weight.numel() + model.fc.weight.numel()
    zeros = int((model.conv2.weight == 0).sum() + (model.fc.weight == 0).sum())
    assert zeros == round(0.7 * total)


def test_nm_and_block_recipes_run():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recipe = """
modifiers:
  - {type: MagnitudePruning, params: conv2, final_sparsity: 0.5, mask_type: "2:4", end_epoch: 1, update_frequency: 0.5}
  - {type: MagnitudePruning, params: fc, final_sparsity: 0.75, mask_type: block4, end_epoch: 1, update_frequency: 0.5}
"""
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=2)
    train(model, opt, session, 4)
    w = model.conv2.weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((w != 0).sum(-1) <= 2).all()
    blocks = (model.fc.weight != 0).reshape(10, 4, 4).sum(-1)
    assert ((blocks == 0) | (blocks == 4)).all() and (blocks == 0).float().mean() == 0.75


def test_overlapping_pruning_modifiers_are_an_error():
    recipe = "modifiers: [{type: MagnitudePruning, params: fc, final_sparsity: 0.5}, {type: ConstantPruning, params: Linear}]"
    with pytest.raises(RecipeError, match="both prune 'fc.weight'"):
        sparsify.apply(make(), recipe)


def test_target_errors_surface_at_apply():
    with pytest.raises(RecipeError, match="bn1.weight"):
        sparsify.apply(make(), "modifiers: [{type: MagnitudePruning, params: bn1.weight, final_sparsity: 0.5}]")
    with pytest.raises(RecipeError, match="2:4"):
        sparsify.apply(make(), "modifiers: [{type: MagnitudePruning, params: conv1, final_sparsity: 0.5, mask_type: '2:4'}]")


def test_learning_rate_modifiers():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    recipe = """
modifiers:
  - {type: SetLearningRate, learning_rate: 0.5}
  - {type: LearningRateFunction, lr_func: linear, init_lr: 0.4, final_lr: 0.0, start_epoch: 1, end_epoch: 2}
  - {type: StepLearningRate, init_lr: 0.1, gamma: 0.5, step_size: 1, start_epoch: 3}
  - {type: SetWeightDecay, weight_decay: 0.01, start_epoch: 2}
"""
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=4)
    lrs, wds = [opt.param_groups[0]["lr"]], [opt.param_groups[0]["weight_decay"]]
    for _ in range(20):
        session.step()
        lrs.append(opt.param_groups[0]["lr"])
        wds.append(opt.param_groups[0]["weight_decay"])
    assert lrs[:4] == [0.5] * 4
    assert lrs[4:9] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    assert lrs[12:16] == pytest.approx([0.1] * 4) and lrs[16:20] == pytest.approx([0.05] * 4)
    assert wds[7] == 0 and wds[8] == 0.01


def test_cosine_lr_per_step():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    session = sparsify.apply(model, "modifiers: [{type: LearningRateFunction, lr_func: cosine, init_lr: 0.1, final_lr: 0.0, end_epoch: 1}]", optimizer=opt, steps_per_epoch=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    session.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_lr_modifier_without_optimizer():
    with pytest.raises(RecipeError, match="optimizer"):
        sparsify.apply(make(), "modifiers: [{type: SetLearningRate, learning_rate: 0.1}]")


def run(steps, interrupt_at=None, session_first=False):
    """Train ``steps`` steps; with ``interrupt_at``, save everything there, rebuild from scratch,
    load, and continue (what `sparsify apply --resume` does)."""
    recipe = sparsify.load_recipe(PRUNE.format(func="cubic"))
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=3)
    if interrupt_at is None:
        train(model, opt, session, steps)
        return model, session
    train(model, opt, session, interrupt_at)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "session": session.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = make(seed=123)  # different init: everything must come from the checkpoint
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if session_first:  # the order sparsify.train uses
        session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=3)
        session.load_state_dict(saved["session"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    if not session_first:
        session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=3)
        session.load_state_dict(saved["session"])
    train(model, opt, session, steps - interrupt_at, first=interrupt_at)
    return model, session


@pytest.mark.parametrize("interrupt_at,session_first", [(2, False), (4, False), (7, False), (4, True), (7, True)])
def test_resume_is_bit_identical(interrupt_at, session_first):
    reference, ref_session = run(11)
    resumed, session = run(11, interrupt_at, session_first)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert ref_session.masks.keys() == session.masks.keys()
    for name, mask in ref_session.masks.items():
        assert torch.equal(mask, session.masks[name])
    assert session.epoch == ref_session.epoch


def test_resume_with_another_recipe_is_refused():
    model = make()
    state = sparsify.apply(model, PRUNE.format(func="cubic")).state_dict()
    other = sparsify.apply(make(), "modifiers: [{type: EpochRange, end_epoch: 1}]")
    with pytest.raises(CheckpointError, match="modifiers"):
        other.load_state_dict(state)


def test_one_recipe_applies_to_two_models_independently():
    recipe = sparsify.load_recipe("modifiers: [{type: MagnitudePruning, params: fc, final_sparsity: 0.5}]")
    a, b = make(0), make(1)
    sa, sb = sparsify.apply(a, recipe), sparsify.apply(b, recipe)
    assert sa.modifiers[0] is not sb.modifiers[0]
    assert not torch.equal(sa.masks["fc.weight"], sb.masks["fc.weight"])


def test_bad_session_arguments():
    with pytest.raises(RecipeError, match="steps_per_epoch"):
        sparsify.apply(make(), "modifiers: [{type: EpochRange}]", steps_per_epoch=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_hold_on_cuda():
    model = make().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    recipe = "modifiers: [{type: MagnitudePruning, params: [conv2, fc], final_sparsity: 0.5, mask_type: '2:4', end_epoch: 1, update_frequency: 0.5}]"
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=2)
    for i in range(4):
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x.cuda()), y.cuda()).backward()
        opt.step()
        session.step()
        for name, mask in session.masks.items():
            assert mask.is_cuda and (model.get_parameter(name)[~mask] == 0).all()
    assert session.sparsity()["fc.weight"] == 0.5


@pytest.mark.parametrize("saved", [{"bogus": 1}, [1, 2], {"step": 0, "start_epoch": 0.0,
                                                         "steps_per_epoch": 1, "masks": {}}])
def test_resume_from_a_state_that_is_not_a_session_state_is_refused(saved):
    session = sparsify.apply(make(), PRUNE.format(func="cubic"))
    with pytest.raises(CheckpointError, match="not one Session.state_dict\\(\\) wrote.*modifiers"):
        session.load_state_dict(saved)
