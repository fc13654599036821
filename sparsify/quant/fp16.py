"""FP16 policy: which layers run in half precision and which stay FP32.

Half precision has a 10-bit mantissa and a max of 65504. Layers that reduce over many values
and feed a division or a square root lose the most: normalization layers (their mean/variance
reductions) and softmax (exp of large logits overflows). Those stay FP32 with their inputs cast
up and outputs cast back down; every Conv/Linear/Embedding/activation runs in FP16. Zeros are
exact in FP16, so pruned weights stay pruned.
"""

from __future__ import annotations

import torch
from torch import nn

FP16_KEEP_FP32: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm2d, nn.Softmax, nn.LogSoftmax,
)
# ONNX op types that the ONNX-side conversion keeps in FP32 (same reasons as above)
FP16_KEEP_FP32_OPS: frozenset[str] = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "Softmax", "LogSoftmax", "ReduceMean", "Pow", "Sqrt", "Erf",
})


def keeps_fp32(module: nn.Module) -> bool:
    return isinstance(module, FP16_KEEP_FP32)


def _cast_in(module, args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _cast_out(module, args, out):
    return out.half() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def to_fp16(model: nn.Module) -> nn.Module:
    """Cast ``model`` to float16 in place following the policy above.

    Modules in FP16_KEEP_FP32 keep FP32 parameters and get hooks that run them in FP32 on
    FP16 inputs. Model inputs and outputs are float16 (the caller casts its inputs).
    """
    model.half()
    for m in model.modules():
        if keeps_fp32(m):
            m.float()
            m.register_forward_pre_hook(_cast_in)
            m.register_forward_hook(_cast_out)
    return model
