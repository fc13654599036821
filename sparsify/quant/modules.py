"""Fake-quant Conv2d / Linear, in place.

``prepare`` turns each targeted ``nn.Conv2d`` / ``nn.Linear`` into its Quant subclass by swapping
``__class__`` on the same object: parameter names, Parameter objects (so the optimizer and the
pruning masks keep working), and hooks other modifiers registered all stay as they were. The
quantization state is a few buffers and child modules on that object:

* ``input_quant``: ``ActQuant`` on the layer's input (uint8, per tensor);
* ``output_quant``: ``ActQuant`` on the unit's output, only where the output feeds something that
  is not another quantized layer (applied by a forward hook on the unit's last module);
* ``weight_scale``: int8 per-output-channel scales of the (BN-folded) weight.

A conv followed by BatchNorm2d is fake-quantized with the BN folded into its weight (Jacob et al.
2018): w_fold = w * gamma / sqrt(running_var + eps) is fake-quantized, the conv output is divided
back by that factor, and the model's own BN then normalizes as usual, so BN keeps learning its
statistics until ``freeze_bn`` switches it to its running statistics.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sparsify.quant import scales
from sparsify.quant.observer import ActQuant


def bn_factor(bn: nn.BatchNorm2d) -> torch.Tensor:
    """gamma / sqrt(running_var + eps); a zero factor (gamma == 0) is replaced by 1."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    sf = gamma / torch.sqrt(bn.running_var + bn.eps)
    return torch.where(sf == 0, torch.ones_like(sf), sf)


class _QuantMixin:
    """Shared weight handling; the subclasses only differ in the op they call."""

    def _init_quant(self, per_channel: bool, act_symmetric: bool) -> None:
        self.per_channel = per_channel
        self.weight_observing = True
        self.add_module("input_quant", ActQuant(symmetric=act_symmetric))
        self.output_quant = None
        self.register_buffer("weight_scale", scales.weight_scales(self.weight, per_channel))
        object.__setattr__(self, "_bn", None)  # not a child: the BN stays where the model has it
        # True when a hook upstream already fake-quantizes the input with input_quant
        object.__setattr__(self, "_prequantized", False)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._prequantized else self.input_quant(x)

    def _simulates_int_bias(self) -> bool:
        # in eval with fixed scales, compute what the exported graph computes: its Conv/Gemm
        # bias is int32 in steps of input_scale * weight_scale. Training keeps the float bias
        # (BN normalizes with batch statistics there anyway).
        aq = self.input_quant
        return (not self.training and aq.quantizing and aq.initialized and not aq.observing
                and not self.weight_observing)

    def _int_bias(self, b: torch.Tensor) -> torch.Tensor:
        """``b`` rounded exactly as sparsify.qdq stores it (float64 math, float32 scale)."""
        bscale = (self.input_quant.scale.double() * self.weight_scale.double()).float()
        q = torch.round(b.double() / bscale.double()).clamp(-(2**31), 2**31 - 1)
        return q.float() * bscale

    def _fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        if self.weight_observing:
            self.weight_scale.copy_(scales.weight_scales(w, self.per_channel))
        return scales.fake_quant_weight(w, self.weight_scale)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        bn = self._bn
        if bn is None:
            b = self.bias
            if b is not None and self._simulates_int_bias():
                b = self._int_bias(b.detach())
            return self._conv_forward(x, self._fake_quant(self.weight), b)
        sf = bn_factor(bn)
        w = self._fake_quant(self.weight * sf.reshape(-1, 1, 1, 1))
        y = self._conv_forward(x, w, None) / sf.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        if self._simulates_int_bias():
            # the BN that follows scales by gamma/std: pre-divide so its output moves by delta
            _, b = folded(self)
            true_sf = folded_factor(bn)
            delta = torch.where(true_sf != 0, (self._int_bias(b) - b) / true_sf, 0.0)
            y = y + delta.reshape(1, -1, 1, 1)
        return y


class QuantLinear(_QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        w = self._fake_quant(self.weight)
        # a 2-D input exports as Gemm, whose bias is int32; a 3-D one as MatMul + FP32 Add
        if x.dim() == 2 and self.bias is not None and self._simulates_int_bias():
            return F.linear(x, w, self._int_bias(self.bias.detach()))
        return F.linear(x, w, self.bias)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalizes with its running statistics (after freeze_bn_stats)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}
FLOAT_CLASSES = {v: k for k, v in QUANT_CLASSES.items()}


def remove_quant_hooks(module: nn.Module) -> None:
    """Drop the forward hooks that ActQuant observers put on ``module`` (works on deep copies,
    where the RemovableHandles would still point at the original's hook dicts)."""
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), ActQuant):
            del module._forward_hooks[key]


def is_quantized(module: nn.Module) -> bool:
    return type(module) in FLOAT_CLASSES


def folded(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias with its BN folded in (running statistics), FP32."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else None
    bn = getattr(module, "_bn", None)
    if bn is None:
        return w.clone(), (b.clone() if b is not None else None)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
    mean = bn.running_mean
    base = b if b is not None else torch.zeros_like(mean)
    # gamma == 0 channels: bn_factor returned 1 for the QAT path, but the true fold is 0
    true_sf = folded_factor(bn)
    return w * true_sf.reshape(-1, 1, 1, 1), (base - mean) * true_sf + beta


def folded_factor(bn: nn.BatchNorm2d) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) as folded into the exported conv (zeros kept)."""
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def export_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(weight on the int8 grid as FP32, FP32 bias, per-channel scales) as exported."""
    w, b = folded(module)
    if module.weight_observing:
        scale = scales.weight_scales(w, module.per_channel)
    else:
        scale = module.weight_scale.detach().clone()
    return scales.round_weight(w, scale), b, scale
