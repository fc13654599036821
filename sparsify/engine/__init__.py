"""sparsify's CPU inference engine: runs standard ONNX graphs, skipping the zeros of pruned weights.

``Engine(path)`` loads a model into a plan once; ``engine.run(feeds)`` runs it. Nothing here
imports torch. Imports are lazy so that ``import sparsify.engine`` stays cheap.
"""

from importlib import import_module

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
