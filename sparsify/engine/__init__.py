"""sparsify's CPU inference engine: runs standard ONNX graphs, skipping the zeros of pruned weights.

``Engine(path)`` loads a model into a plan once; ``engine.run(feeds)`` runs it. Nothing here
imports torch. Imports are lazy so that ``import sparsify.engine`` stays cheap.
"""

import os
from importlib import import_module

# The core's OpenMP threads spin while they wait for work unless told otherwise. That is fast on
# an idle machine and collapses when cores are shared: ResNet-50 90% sparse at 2 threads on a
# busy 2-core machine took 2.8 s per image spinning, 0.19 s passive (onnxruntime: 0.4 s).
# libgomp reads this once, when the core loads; set OMP_WAIT_POLICY=active to spin.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "passive"

# public name -> module that defines it
_EXPORTS = {
    "Engine": "sparsify.engine.engine",
    "engine_report": "sparsify.engine.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparsify.engine' has no attribute {name!r}")
