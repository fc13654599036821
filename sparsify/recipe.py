"""Load a YAML recipe into a validated list of modifiers.

Native format (see docs/recipes.md)::

    sparsity: 0.9                   # top-level scalars are variables
    end: 10
    modifiers:
      - type: MagnitudePruning
        params: [Conv2d, Linear]
        ignore: [conv1]
        final_sparsity: eval(sparsity)
        start_epoch: 0
        end_epoch: eval(end - 2)

SparseML recipes (``!GMPruningModifier`` tags, ``*_modifiers`` groups, stages) are recognised and
translated by ``sparsify.sparseml``. Every problem is a RecipeError naming the file, the
modifier, the field and, for typos, the closest valid name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sparsify import sparseml
from sparsify.errors import RecipeError
from sparsify.modifiers import MODIFIERS
from sparsify.modifiers.base import Modifier, explain_validation, recipe_fields


@dataclass
class Recipe:
    """A validated recipe. ``modifiers`` run in list order at every step."""

    modifiers: list[Modifier]
    text: str = ""
    path: Path | None = None
    variables: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "<recipe text>"

    @property
    def end_epoch(self) -> float:
        """The last epoch any modifier needs: how long a training loop should run."""
        return max((m.last_epoch for m in self.modifiers), default=0.0)


def _read(source: str | Path) -> tuple[str, Path | None]:
    if isinstance(source, Path):
        path = source
    elif isinstance(source, str) and "\n" not in source and source.strip().endswith((".yaml", ".yml", ".md")):
        path = Path(source.strip())
    else:
        return str(source), None
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory; pass a YAML file path or YAML text")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist (pass a YAML file path or YAML text)")
    try:
        return path.read_text(encoding="utf-8"), path
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe file {path}: {err}") from None


def _front_matter(text: str) -> str:
    """SparseML ships recipes as markdown with the YAML between two '---' lines."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() == "---":
                return "\n" + "\n".join(lines[1:i])  # keeps YAML error lines = file lines
    return text


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(_front_matter(text), Loader=sparseml.RecipeLoader)  # noqa: S506 (safe subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "invalid YAML"
        raise RecipeError(f"{where}: malformed YAML{at}: {problem}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: malformed YAML: {err}") from None


def load_recipe(source: str | Path | Recipe) -> Recipe:
    """Load a recipe from a YAML file path or from YAML text."""
    if isinstance(source, Recipe):
        return source
    text, path = _read(source)
    where = str(path) if path else "<recipe text>"
    data = parse_yaml(text, where)
    if sparseml.is_sparseml(data):
        items, variables = sparseml.translate(data, where)
    else:
        items, variables = _native_items(data, where)
    modifiers = [build_modifier(item, i, where) for i, item in enumerate(items)]
    if not modifiers:
        raise RecipeError(f"{where}: the recipe has no modifiers")
    return Recipe(modifiers=modifiers, text=text, path=path, variables=variables)


def _native_items(data: Any, where: str) -> tuple[list[dict], dict[str, Any]]:
    if isinstance(data, str) and "\n" not in data.strip():
        if Path(data.strip()).is_file():
            raise RecipeError(f"recipe {data!r} is a file but not a recipe: name a .yaml, .yml or "
                              f".md file that holds a 'modifiers' list")
        raise RecipeError(
            f"recipe {data!r} is neither an existing .yaml file nor YAML text with a 'modifiers' list"
        )
    if not isinstance(data, dict):
        raise RecipeError(
            f"{where}: a recipe must be a mapping with a 'modifiers' list, got {type(data).__name__}"
        )
    if "modifiers" not in data:
        raise RecipeError(f"{where}: no 'modifiers' list found (top-level keys: {', '.join(map(str, data))})")
    items = data["modifiers"]
    if not isinstance(items, list):
        raise RecipeError(f"{where}: 'modifiers' must be a list of mappings with a 'type' key")
    variables = sparseml.resolve_variables({k: v for k, v in data.items() if k != "modifiers"}, where)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "type" not in item:
            raise RecipeError(
                f"{where}: modifier #{i + 1} must be a mapping with a 'type' key, e.g. "
                f"'- type: MagnitudePruning', got {item!r}"
            )
        out.append(sparseml.substitute(item, variables, f"{where}: modifier #{i + 1}"))
    return out, variables


def build_modifier(item: dict, index: int, where: str) -> Modifier:
    """Validate one ``{type: Name, field: value, ...}`` mapping into a Modifier."""
    item = dict(item)
    name = item.pop("type")
    label = f"modifier #{index + 1} ({name})"
    cls = MODIFIERS.get(name) if isinstance(name, str) else None
    if cls is None:
        close = difflib.get_close_matches(str(name), list(MODIFIERS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(
            f"{where}: modifier #{index + 1}: unknown modifier type {name!r}{hint} "
            f"Known: {', '.join(MODIFIERS)}"
        )
    allowed = recipe_fields(cls)
    for key in item:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(
                f"{where}: {label}: unknown field {key!r}; {hint}allowed fields: {', '.join(allowed)}"
            )
    try:
        modifier = cls.model_validate(item)
    except ValidationError as err:
        raise RecipeError(f"{where}: {label}: {explain_validation(err)}") from None
    except RecipeError as err:
        # Modifier.__init__ (which validation runs) names the class only: name the file and
        # the modifier's position instead
        detail = str(err).removeprefix(f"{cls.__name__}: ")
        raise RecipeError(f"{where}: {label}: {detail}") from None
    modifier.index_ = index
    return modifier

