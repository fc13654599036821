"""Read SparseML recipes unchanged: YAML tags, variables, eval() arithmetic, groups and stages.

``RecipeLoader`` is yaml.SafeLoader plus one rule: a local tag such as ``!GMPruningModifier`` on
a mapping becomes plain data (``Tagged``). Nothing in a recipe can construct a Python object or
run code; ``eval(...)`` strings go through ``safe_eval``, an ``ast`` walker that accepts numbers,
recipe variables, arithmetic operators and a few numeric functions, and nothing else.

``translate`` turns the SparseML modifiers into native ``{type: ..., field: ...}`` items (the
translation table is ``TRANSLATORS``). A SparseML field sparsify cannot honour is a RecipeError
naming it, never dropped. The mapping is documented in docs/recipes.md.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from sparsify.errors import RecipeError


@dataclass
class Tagged:
    """A ``!Name`` tagged mapping from the YAML, kept as data."""

    tag: str
    fields: dict
    line: int


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``!Name {...}`` as ``Tagged`` instead of refusing it, and refuses
    a key written twice in one mapping (plain YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag.endswith(":str"):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"duplicate key {key_node.value!r} (first at line {seen[key_node.value]})",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _construct_tagged(loader: RecipeLoader, suffix: str, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        fields = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.ScalarNode) and not node.value:
        fields = {}
    else:
        raise yaml.constructor.ConstructorError(
            None, None, f"tag !{suffix} must be on a mapping of fields", node.start_mark
        )
    return Tagged(suffix, dict(fields), node.start_mark.line + 1)


RecipeLoader.add_multi_constructor("!", _construct_tagged)


# --- safe arithmetic ---------------------------------------------------------------------------

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS: dict[str, Callable[..., Any]] = {
    "min": min, "max": max, "round": round, "int": int, "float": float, "abs": abs,
}
_EVAL = re.compile(r"^\s*eval\((.*)\)\s*$", re.DOTALL)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def safe_eval(expr: str, variables: dict[str, Any], where: str) -> Any:
    """Evaluate arithmetic over numbers and recipe variables; anything else is a RecipeError."""

    def fail(why: str) -> RecipeError:
        return RecipeError(
            f"{where}: eval({expr}) is not allowed: {why}. Only numbers, recipe variables, "
            f"+ - * / // % **, parentheses and {', '.join(_FUNCS)}() may appear"
        )

    def number(node: ast.AST) -> Any:
        value = walk(node)
        if not _is_number(value):
            raise fail(f"{ast.unparse(node)!r} is not a number")
        return value

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            if not _is_number(node.value):
                raise fail(f"{node.value!r} is not a number")
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise fail(f"{node.id!r} is not a recipe variable (defined: {', '.join(variables) or 'none'})")
            return variables[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = number(node.left), number(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise fail("exponent or base too large")
            try:
                result = _BINOPS[type(node.op)](left, right)
                # math.isfinite raises OverflowError for an int beyond the float range
                finite = not isinstance(result, complex) and math.isfinite(result)
            except (ZeroDivisionError, OverflowError, ValueError) as err:
                raise fail(str(err)) from None
            if not finite:
                raise fail("the result is not a finite real number")
            return result
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](number(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            if node.keywords:
                raise fail("keyword arguments are not allowed")
            return _FUNCS[node.func.id](*[number(a) for a in node.args])
        raise fail(f"{type(node).__name__} {ast.unparse(node)!r} is not arithmetic")

    if len(expr) > 500:
        raise fail("the expression is longer than 500 characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as err:
        raise fail(f"syntax error ({err.msg})") from None
    try:
        return walk(tree)
    except (TypeError, ValueError, OverflowError) as err:  # min() with no arguments, float(10**400)
        raise fail(str(err)) from None


def substitute(obj: Any, variables: dict[str, Any], where: str) -> Any:
    """Replace every ``eval(...)`` string inside ``obj`` by its value."""
    if isinstance(obj, str):
        match = _EVAL.match(obj)
        return safe_eval(match[1], variables, where) if match else obj
    if isinstance(obj, list):
        return [substitute(v, variables, where) for v in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, variables, where) for k, v in obj.items()}
    if isinstance(obj, Tagged):
        return Tagged(obj.tag, substitute(obj.fields, variables, where), obj.line)
    return obj


def resolve_variables(raw: dict[str, Any], where: str, inherited: dict | None = None) -> dict[str, Any]:
    """Top-level scalars (and lists of scalars) are variables; ``eval`` values may use others,
    in any order. Mappings are not variables (a native recipe has none besides 'modifiers')."""
    done = dict(inherited or {})
    pending: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, (dict, Tagged)) or (isinstance(value, list) and any(isinstance(v, (dict, Tagged)) for v in value)):
            raise RecipeError(
                f"{where}: top-level key {key!r} holds a mapping or modifiers; only 'modifiers' "
                "(native) or '*_modifiers' groups (SparseML) may hold modifiers, other keys are variables"
            )
        if isinstance(value, str) and _EVAL.match(value):
            pending[str(key)] = _EVAL.match(value)[1]
        else:
            done[str(key)] = value
    while pending:
        progressed = False
        for key, expr in list(pending.items()):
            names = {n.id for n in ast.walk(_parse_or_none(expr)) if isinstance(n, ast.Name)}
            if names & set(pending):
                continue
            done[key] = safe_eval(expr, done, f"{where}: variable {key!r}")
            del pending[key]
            progressed = True
        if not progressed:
            raise RecipeError(f"{where}: variables {', '.join(pending)} refer to each other in a cycle")
    return done


def _parse_or_none(expr: str) -> ast.AST:
    try:
        return ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return ast.Module(body=[], type_ignores=[])  # safe_eval reports the syntax error


# --- recipe structure --------------------------------------------------------------------------


def _contains_tag(obj: Any) -> bool:
    if isinstance(obj, Tagged):
        return True
    if isinstance(obj, dict):
        return any(_contains_tag(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_contains_tag(v) for v in obj)
    return False


def is_sparseml(data: Any) -> bool:
    """SparseML recipes tag their modifiers (``!GMPruningModifier``); native ones use ``type:``."""
    return _contains_tag(data)


def _is_group(key: Any, value: Any) -> bool:
    return isinstance(key, str) and "modifiers" in key and isinstance(value, list)


def _is_stage(value: Any) -> bool:
    return isinstance(value, dict) and any(_is_group(k, v) for k, v in value.items())


def _split(mapping: dict, where: str) -> tuple[list[Tagged], dict[str, Any], dict[str, dict]]:
    """(modifiers of the groups, variable values, stages) of one recipe level."""
    mods: list[Tagged] = []
    raw_vars: dict[str, Any] = {}
    stages: dict[str, dict] = {}
    for key, value in mapping.items():
        if _is_group(key, value):
            for item in value:
                if not isinstance(item, Tagged):
                    raise RecipeError(
                        f"{where}: group {key!r} holds {item!r}; SparseML modifiers are tagged "
                        "mappings such as '- !GMPruningModifier {...}'"
                    )
                mods.append(item)
        elif _is_stage(value):
            stages[str(key)] = value
        elif isinstance(value, dict) and (str(key).startswith("__") or key == "metadata"):
            continue  # recipe metadata written by SparseML tools: describes, changes nothing
        else:
            raw_vars[key] = value
    return mods, raw_vars, stages


def translate(data: Any, where: str) -> tuple[list[dict], dict[str, Any]]:
    """Native modifier items and the top-level variables of a SparseML recipe.

    Stages run one after another: each stage's epochs count from the end of the previous stage
    (the largest epoch its modifiers reach). Stage-level variables override top-level ones.
    """
    if isinstance(data, list):  # a bare list of modifiers
        data = {"modifiers": data}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a SparseML recipe must be a mapping, got {type(data).__name__}")
    mods, raw_vars, stages = _split(data, where)
    variables = resolve_variables(raw_vars, where)
    items = _translate_all(mods, variables, where, offset=0.0)
    offset = _last_epoch(items)
    for name, stage in stages.items():
        stage_mods, stage_vars, nested = _split(stage, f"{where}: stage {name!r}")
        if nested:
            raise RecipeError(f"{where}: stage {name!r} holds nested stages, which are not supported")
        scope = resolve_variables(stage_vars, f"{where}: stage {name!r}", inherited=variables)
        stage_items = _translate_all(stage_mods, scope, f"{where}: stage {name!r}", offset)
        items += stage_items
        offset = max(offset, _last_epoch(stage_items))
    if not items:
        raise RecipeError(f"{where}: no '*modifiers' list with tagged modifiers found")
    return items, variables


def _last_epoch(items: list[dict]) -> float:
    return max((max(i.get("start_epoch", 0.0), i.get("end_epoch", -1.0)) for i in items), default=0.0)


def _translate_all(mods: list[Tagged], variables: dict, where: str, offset: float) -> list[dict]:
    items: list[dict] = []
    for mod in mods:
        at = f"{where}: !{mod.tag} (line {mod.line})"
        fields = substitute(mod.fields, variables, at)
        translator = TRANSLATORS.get(mod.tag)
        if translator is None:
            close = difflib.get_close_matches(mod.tag, list(TRANSLATORS), n=1, cutoff=0.5)
            hint = f"; did you mean !{close[0]}?" if close else ""
            raise RecipeError(
                f"{at}: SparseML modifier !{mod.tag} is not supported by sparsify{hint} "
                f"Supported: {', '.join(TRANSLATORS)}"
            )
        translated = translator(dict(fields), at)
        for item in translated:  # stages add epochs up before the native validation runs
            for key in ("start_epoch", "end_epoch"):
                if key in item and not _is_number(item[key]):
                    raise RecipeError(
                        f"{at}: field {key!r} = {item[key]!r} is not a number; write an epoch "
                        "such as 2 or 2.5 (-1: from the start / never ends)"
                    )
        items += [_shift(item, offset) for item in translated]
    return items


# fields holding an epoch, moved by a stage's offset (-1 and None mean "never" and stay)
_EPOCH_FIELDS = ("start_epoch", "end_epoch", "freeze_bn_stats_epoch", "disable_quantization_observer_epoch")


def _shift(item: dict, offset: float) -> dict:
    if not offset:
        return item
    for key in _EPOCH_FIELDS:
        if isinstance(item.get(key), (int, float)) and item[key] != -1:
            item[key] = item[key] + offset
    if isinstance(item.get("milestones"), list):
        item["milestones"] = [m + offset for m in item["milestones"]]
    return item


# --- translation table -------------------------------------------------------------------------
# Each translator takes the SparseML fields (eval already applied) and returns native items. It
# pops every field it honours; whatever is left is reported by _leftover, never dropped.

LOGGING_ONLY = ("log_types", "constant_logging")  # change what SparseML logged, not the training


def _leftover(fields: dict, at: str, allowed: str) -> None:
    for key in LOGGING_ONLY:
        fields.pop(key, None)
    if fields:
        key = next(iter(fields))
        close = difflib.get_close_matches(str(key), allowed.split(", "), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(
            f"{at}: field {key!r} cannot be honoured by sparsify; {hint}remove or fix it "
            f"(supported fields: {allowed})"
        )


def _epochs(fields: dict, out: dict) -> None:
    # SparseML writes -1 for "from the start" (start) and "never" (end)
    start = fields.pop("start_epoch", -1)
    out["start_epoch"] = 0.0 if start == -1 else start
    if "end_epoch" in fields:
        out["end_epoch"] = fields.pop("end_epoch")


def _copy(fields: dict, out: dict, *names: str, rename: dict | None = None) -> None:
    for name in names:
        if name in fields:
            out[(rename or {}).get(name, name)] = fields.pop(name)


def _pruning(kind: str) -> Callable[[dict, str], list[dict]]:
    def translate_pruning(fields: dict, at: str) -> list[dict]:
        base: dict = {"type": kind}
        _epochs(fields, base)
        if fields.pop("global_sparsity", False):
            base["type"] = "GlobalMagnitudePruning"
        if fields.get("score_type", "magnitude") != "magnitude":
            raise RecipeError(f"{at}: score_type {fields['score_type']!r} is not supported; only 'magnitude'")
        fields.pop("score_type", None)
        if fields.pop("phased", False):
            raise RecipeError(f"{at}: phased: true (alternating pruned/dense phases) is not supported")
        init = fields.pop("init_sparsity", 0.0)
        base["init_sparsity"] = "from_param" if init == "__FROM_PARAM__" else init
        freq = fields.pop("update_frequency", 1.0)
        if freq != -1:  # -1: no intermediate updates (one shot at start and the final at end)
            base["update_frequency"] = freq
        elif base.get("end_epoch", -1) != -1:
            base["update_frequency"] = max(base["end_epoch"] - base["start_epoch"], 1e-6)
        _copy(fields, base, "inter_func", "mask_type", "leave_enabled")
        params = fields.pop("params", "__ALL_PRUNABLE__")
        final = fields.pop("final_sparsity", None)
        _leftover(fields, at, "params, init_sparsity, final_sparsity, start_epoch, end_epoch, "
                  "update_frequency, inter_func, mask_type, leave_enabled, global_sparsity")
        if final is None:
            raise RecipeError(f"{at}: missing required field 'final_sparsity'")
        if not isinstance(final, dict):
            return [{**base, "params": params, "final_sparsity": final}]
        # {sparsity: [params]}: one modifier per sparsity level
        items = []
        for sparsity, names in final.items():
            items.append({**base, "params": names, "final_sparsity": _number(sparsity, at)})
        return items

    return translate_pruning


def _number(value: Any, at: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{at}: final_sparsity key {value!r} is not a number") from None


def _constant(fields: dict, at: str) -> list[dict]:
    out: dict = {"type": "ConstantPruning"}
    _epochs(fields, out)
    fields.pop("update_frequency", None)  # constant masks never need an update
    _copy(fields, out, "params")
    _leftover(fields, at, "params, start_epoch, end_epoch, update_frequency")
    return [out]


def _simple(kind: str, *names: str) -> Callable[[dict, str], list[dict]]:
    def translate_simple(fields: dict, at: str) -> list[dict]:
        out: dict = {"type": kind}
        _epochs(fields, out)
        fields.pop("update_frequency", None)  # these apply every step anyway
        _copy(fields, out, *names)
        _leftover(fields, at, ", ".join(("start_epoch", "end_epoch", "update_frequency") + names))
        return [out]

    return translate_simple


def _lr_function(fields: dict, at: str) -> list[dict]:
    if fields.get("lr_func", "linear") not in ("linear", "cosine", "cyclic_linear"):
        raise RecipeError(
            f"{at}: lr_func {fields['lr_func']!r} is not supported; use linear, cosine or cyclic_linear"
        )
    names = ("lr_func", "init_lr", "final_lr", "cycle_epochs", "param_groups")
    return _simple("LearningRateFunction", *names)(fields, at)


_LR_CLASSES = {"StepLR": ("step_size", "gamma"), "MultiStepLR": ("milestones", "gamma"), "ExponentialLR": ("gamma",)}


def _lr_class(fields: dict, at: str) -> list[dict]:
    lr_class = fields.pop("lr_class", None)
    if lr_class not in _LR_CLASSES:
        raise RecipeError(f"{at}: lr_class {lr_class!r} is not supported; use one of {', '.join(_LR_CLASSES)}")
    kwargs = fields.pop("lr_kwargs", None) or {}
    if not isinstance(kwargs, dict):
        raise RecipeError(
            f"{at}: field 'lr_kwargs' = {kwargs!r} must be a mapping of {lr_class} arguments, "
            f"e.g. {{{', '.join(f'{k}: ...' for k in _LR_CLASSES[lr_class])}}}"
        )
    kwargs = dict(kwargs)
    out: dict = {"type": "StepLearningRate"}
    _epochs(fields, out)
    fields.pop("update_frequency", None)
    _copy(fields, out, "init_lr", "param_groups")
    for key in _LR_CLASSES[lr_class]:
        if key in kwargs:
            out[key] = kwargs.pop(key)
    if kwargs:
        raise RecipeError(
            f"{at}: lr_kwargs {next(iter(kwargs))!r} cannot be honoured for {lr_class} "
            f"(supported: {', '.join(_LR_CLASSES[lr_class])})"
        )
    if lr_class == "StepLR" and "step_size" not in out:
        raise RecipeError(f"{at}: StepLR needs lr_kwargs.step_size")
    if lr_class == "MultiStepLR" and "milestones" not in out:
        raise RecipeError(f"{at}: MultiStepLR needs lr_kwargs.milestones")
    _leftover(fields, at, "lr_class, lr_kwargs, init_lr, start_epoch, end_epoch, param_groups")
    return [out]


def _distillation(fields: dict, at: str) -> list[dict]:
    # SparseML's key selection for dict outputs; a plain logits tensor needs neither
    for key in ("distill_output_keys", "teacher_input_keys"):
        if fields.get(key) is not None:
            raise RecipeError(f"{at}: field {key!r} is not supported; the student and teacher must return logits")
        fields.pop(key, None)
    return _simple("Distillation", "hardness", "temperature")(fields, at)


def _quantization(fields: dict, at: str) -> list[dict]:
    """Handled by the QUANT module when it is installed in the modifier table."""
    from sparsify.modifiers import MODIFIERS

    if "Quantization" not in MODIFIERS:
        raise RecipeError(f"{at}: QuantizationModifier is not available in this build of sparsify")
    from sparsify.modifiers import quantization

    return quantization.from_sparseml(fields, at)


TRANSLATORS: dict[str, Callable[[dict, str], list[dict]]] = {
    "GMPruningModifier": _pruning("MagnitudePruning"),
    "MagnitudePruningModifier": _pruning("MagnitudePruning"),
    "GlobalMagnitudePruningModifier": _pruning("GlobalMagnitudePruning"),
    "ConstantPruningModifier": _constant,
    "EpochRangeModifier": _simple("EpochRange"),
    "SetLearningRateModifier": _simple("SetLearningRate", "learning_rate", "param_groups"),
    "LearningRateFunctionModifier": _lr_function,
    "LearningRateModifier": _lr_class,
    "SetWeightDecayModifier": _simple("SetWeightDecay", "weight_decay", "param_groups"),
    "DistillationModifier": _distillation,
    "QuantizationModifier": _quantization,
}
