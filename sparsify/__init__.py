"""sparsify: prune and quantize PyTorch models with YAML recipes, export standard ONNX, and run
it on a sparse CPU engine.

Imports are lazy so that the engine's CPU path (``sparsify.engine``) works without torch.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_recipe": "sparsify.recipe",
    "apply": "sparsify.session",
    "Session": "sparsify.session",
    "export": "sparsify.export",
    "Engine": "sparsify.engine",
    "SparsifyError": "sparsify.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
