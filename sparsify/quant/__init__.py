"""Quantization in torch: fake-quant INT8 (QAT and post-training calibration) and FP16.

Public API (EXPORT and the QuantizationModifier use these):

* ``prepare(model, scheme, targets, ignore)``: insert fake quantization in place;
* ``calibrate(model, batches, method="minmax"|"percentile"|"entropy", num_batches, percentile)``;
* ``quantization_state(model) -> dict``: scales/zero-points per layer for ``sparsify.qdq``;
* ``strip_fake_quant(model) -> nn.Module``: FP32 copy with BN folded and weights on the int8
  grid, ready for ``torch.onnx.export``;
* ``fold_batchnorm(model)``; ``to_fp16(model)`` and the FP16 policy constants;
* schedule switches ``set_observing``, ``set_quantizing``, ``freeze_bn_stats``.

See docs/quantization.md.
"""

from sparsify.quant.calibrate import METHODS, calibrate
from sparsify.quant.fp16 import FP16_KEEP_FP32, FP16_KEEP_FP32_OPS, keeps_fp32, to_fp16
from sparsify.quant.modules import QuantConv2d, QuantLinear, is_quantized
from sparsify.quant.observer import ActQuant
from sparsify.quant.prepare import (
    STATE_FORMAT, QuantScheme, act_quants, fold_batchnorm, freeze_bn_stats, prepare, quant_layers,
    quantization_state, select_modules, set_observing, set_quantizing, strip_fake_quant,
)

__all__ = [
    "METHODS", "FP16_KEEP_FP32", "FP16_KEEP_FP32_OPS", "STATE_FORMAT", "ActQuant",
    "QuantConv2d", "QuantLinear", "QuantScheme", "act_quants", "calibrate", "fold_batchnorm",
    "freeze_bn_stats", "is_quantized", "keeps_fp32", "prepare", "quant_layers",
    "quantization_state", "select_modules", "set_observing", "set_quantizing",
    "strip_fake_quant", "to_fp16",
]
