"""Model checkpoints: safe loading, atomic saving, and a strict fit check against a model.

A ``.pt`` file is read with ``torch.load(weights_only=True)``: a pickle that would run code on
load (anything beyond tensors and plain containers) is refused, never executed. ``.safetensors``
files are read with the safetensors library. Writes go through ``sparsify.fileio`` so an
interrupted save never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from sparsify.errors import CheckpointError
from sparsify.fileio import atomic_path

# keys under which training scripts commonly nest the weights
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
_MAX_LISTED = 8


def load_object(path: str | os.PathLike) -> Any:
    """Everything a ``.pt`` file holds (tensors, numbers, strings, containers), loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():
            # torch notes that it checks a sparse tensor (refused after loading, in _as_state_dict)
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(str(err))
        found = re.search(r"GLOBAL (\S+)", detail)
        if found:
            why = f"it is a pickle that would import and call {found.group(1)} on load"
        else:
            why = (f"it is not a plain weights file the safe loader can read ({detail}); a "
                   f"pickle of arbitrary objects can carry code")
        raise CheckpointError(
            f"refused to load {path}: {why}. Save a plain state_dict with "
            f"torch.save(model.state_dict(), path) or use .safetensors") from None
    except Exception as err:  # noqa: BLE001 - whatever the unpickler trips on in a foreign file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "the file is empty"
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {reason}). "
                              f"Is it a torch.save or safetensors file?") from err


def _unpickler_detail(message: str) -> str:
    # torch wraps the reason in several lines of advice (including "set weights_only=False",
    # exactly what we must not do): keep only the reason
    tail = message.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else "unsupported content"


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in ``path`` (``.pt``/``.pth``/``.bin`` or ``.safetensors``) as a state_dict.

    A dict that nests the weights under 'state_dict' or 'model' (as training scripts save them)
    is unwrapped; a DistributedDataParallel 'module.' prefix is dropped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    else:
        obj = load_object(path)
    return _as_state_dict(obj, path)


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} holds no state_dict (found {type(obj).__name__}); save "
                              f"one with torch.save(model.state_dict(), path)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state_dict: entries {_names(map(str, bad))} are "
                              f"not tensors named by strings")
    odd = [k for k, v in obj.items() if v.layout != torch.strided or v.is_meta]
    if odd:
        raise CheckpointError(f"{path}: entries {_names(odd)} are sparse or meta tensors, not "
                              f"weights with values; save dense ones (tensor.to_dense())")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` atomically; the format follows the suffix (.safetensors or .pt).

    ``metadata`` (string to string) goes into the safetensors header, or next to the weights
    under 'metadata' in a ``.pt`` file (which then loads back through the 'state_dict' key).
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(_unshare(tensors), str(tmp), metadata=meta or None)
        else:
            torch.save({"state_dict": tensors, "metadata": meta} if meta else tensors, tmp)
    return path


def save_object(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically ``torch.save`` a training state (tensors and plain containers only)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): give each its own copy
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def _names(names, limit: int = _MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_fit(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
              path: str | os.PathLike) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
              for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit model {type(model).__name__}: "
            + "; ".join(problems)
            + ". Check --model and --data (they set the architecture and its input/output sizes)")


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
              path: str | os.PathLike = "<state_dict>") -> nn.Module:
    """Copy ``state_dict`` into ``model`` after checking that every key fits exactly."""
    check_fit(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return model
