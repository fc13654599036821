"""Resolve recipe target patterns to the model's prunable parameters.

A pattern is one of:
- an exact parameter name (``layer1.0.conv1.weight``) or module name (``layer1.0.conv1``, meaning
  its weight): users should not need to remember ``.weight``;
- ``re:REGEX``, matched from the start of the parameter name (``re.match``, as SparseML does)
  or against the whole module name;
- a module type (``Conv2d``, ``Linear``, or any class name in the module's MRO);
- ``__ALL_PRUNABLE__`` / ``__ALL__``: every prunable parameter.

Prunable: the weight of Linear and Conv (1d/2d/3d, transposed too) layers and the input projection
weights of nn.MultiheadAttention. A pattern that matches nothing, or that names something that is
not prunable (a bias, a BatchNorm weight, an embedding), is a RecipeError: a silent no-op prune is
the bug users of pruning tools complain about most.
"""

from __future__ import annotations

import difflib
import re

import torch.nn as nn

from sparsify.errors import RecipeError

ALL = ("__ALL_PRUNABLE__", "__ALL__")
PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel, so names carry no 'module.'."""
    inner = getattr(model, "module", None)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and inner is not None:
        return inner
    return model


def prunable_params(model: nn.Module) -> dict[str, nn.Module]:
    """Prunable parameter name -> the module that owns it, in model order."""
    found: dict[str, nn.Module] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, PRUNABLE_LAYERS) and isinstance(module.weight, nn.Parameter):
            found[prefix + "weight"] = module
        elif isinstance(module, nn.MultiheadAttention):
            for attr in ATTENTION_WEIGHTS:
                if isinstance(getattr(module, attr, None), nn.Parameter):
                    found[prefix + attr] = module
    return found


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _closest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def match(model: nn.Module, pattern: str, where: str) -> list[str]:
    """Prunable parameter names matched by one pattern (RecipeError if none)."""
    prunable = prunable_params(model)
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(f"{where}: target {pattern!r} must be a non-empty string")
    if pattern in ALL:
        return list(prunable)
    if pattern.startswith("re:"):
        return _match_regex(model, pattern, prunable, where)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    if pattern in prunable:
        return [pattern]
    if pattern in params:
        raise RecipeError(
            f"{where}: target {pattern!r} is not prunable ({_describe(model, pattern)}); "
            "targets must be weights of Conv or Linear layers: remove it from the recipe"
        )
    if pattern in modules and pattern:
        names = [p for p in prunable if _module_of(p) == pattern]
        if names:
            return names
        raise RecipeError(
            f"{where}: target {pattern!r} is a {type(modules[pattern]).__name__}, which has no "
            "prunable weight (only Conv and Linear layers are pruned): remove it from the recipe"
        )
    typed = [p for p, mod in prunable.items() if pattern in _type_names(mod)]
    if typed:
        return typed
    if any(pattern in _type_names(m) for m in modules.values()):
        raise RecipeError(
            f"{where}: target type {pattern!r} is not a prunable layer type (use Conv2d, Linear, ...)"
        )
    candidates = list(params) + [m for m in modules if m] + sorted({type(m).__name__ for m in modules.values()})
    raise RecipeError(
        f"{where}: target {pattern!r} matches no parameter, module or layer type of the model"
        f"{_closest(pattern, candidates)}"
    )


def _describe(model: nn.Module, param_name: str) -> str:
    owner = model.get_submodule(_module_of(param_name))
    return f"{param_name.rpartition('.')[2]} of a {type(owner).__name__}"


def _match_regex(model: nn.Module, pattern: str, prunable: dict[str, nn.Module], where: str) -> list[str]:
    try:
        regex = re.compile(pattern[3:])
    except re.error as err:
        raise RecipeError(f"{where}: target {pattern!r} is not a valid regular expression: {err}") from None
    # SparseML semantics (re.match: anchored at the start of the parameter name), plus a whole
    # module name, so 're:.*conv1$' works without spelling out '.weight'
    hits = [p for p in prunable if regex.match(p) or regex.fullmatch(_module_of(p))]
    if hits:
        return hits
    others = [p for p, _ in model.named_parameters() if regex.match(p)]
    if others:
        raise RecipeError(
            f"{where}: regex {pattern!r} matches only parameters that are not prunable "
            f"(e.g. {others[0]!r}); targets must be weights of Conv or Linear layers"
        )
    raise RecipeError(
        f"{where}: regex {pattern!r} matches no prunable parameter (it must match from the "
        f"start of a name such as {next(iter(prunable), 'conv.weight')!r}, or a whole module name)"
    )


def resolve(model: nn.Module, patterns: list[str], ignore: list[str], where: str) -> list[str]:
    """Prunable parameter names matched by ``patterns`` minus those matched by ``ignore``,
    in model order. Every pattern in either list must match something."""
    model = unwrap(model)
    chosen: set[str] = set()
    for pattern in patterns:
        chosen.update(match(model, pattern, where))
    for pattern in ignore:
        chosen.difference_update(match(model, pattern, f"{where} ignore"))
    if not chosen:
        raise RecipeError(f"{where}: the targets minus 'ignore' leave no parameter to prune")
    return [name for name in prunable_params(model) if name in chosen]
