"""The modifier table: recipe ``type`` name -> class. One entry per modifier, written by hand.

A new modifier is one class (subclass of ``Modifier`` in ``base.py``), one line here and one
test file. SparseML names (``GMPruningModifier``, ...) are translated in ``sparsify/sparseml.py``.
"""

from sparsify.modifiers.base import Modifier, SessionState
from sparsify.modifiers.distillation import Distillation
from sparsify.modifiers.pruning import ConstantPruning, GlobalMagnitudePruning, MagnitudePruning
from sparsify.modifiers.quantization import QuantizationModifier
from sparsify.modifiers.training import (
    EpochRange,
    LearningRateFunction,
    SetLearningRate,
    SetWeightDecay,
    StepLearningRate,
)

MODIFIERS: dict[str, type[Modifier]] = {
    "MagnitudePruning": MagnitudePruning,
    "GlobalMagnitudePruning": GlobalMagnitudePruning,
    "ConstantPruning": ConstantPruning,
    "EpochRange": EpochRange,
    "SetLearningRate": SetLearningRate,
    "LearningRateFunction": LearningRateFunction,
    "StepLearningRate": StepLearningRate,
    "SetWeightDecay": SetWeightDecay,
    "Distillation": Distillation,
    "Quantization": QuantizationModifier,
}

__all__ = ["MODIFIERS", "Modifier", "SessionState"]
