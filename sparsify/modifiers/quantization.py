"""QuantizationModifier: INT8 quantization-aware training, calibration-only INT8, or FP16.

Recipe form (all fields optional)::

    - type: Quantization
      start_epoch: 8.0                          # fake quantization is inserted here
      scheme: W8A8                              # or FP16, W8A8_TENSOR, or the explicit mapping:
      #  {weights: {num_bits: 8, symmetric: true, strategy: channel},
      #   input_activations: {num_bits: 8, symmetric: false, strategy: tensor}}
      ignore: [fc, "re:.*downsample.*", Embedding]   # names, re: regexes, module types
      targets: null                             # default: every Conv2d and Linear
      freeze_bn_stats_epoch: 9.0                # BN folded into convs stops updating
      disable_quantization_observer_epoch: 9.5  # scales fixed from here on
      num_calibration_steps: 32                 # first N steps (or export batches) calibrate
      method: minmax                            # minmax | percentile | entropy
      percentile: 99.99

Schedule (checked after every optimizer step, at the fractional epoch of the next step):
start_epoch inserts the structure; if num_calibration_steps is set, the next N training steps
only observe (plain min/max; for percentile/entropy the second half collects histograms) and
then fake quantization switches on with EMA observers; freeze_bn_stats_epoch and
disable_quantization_observer_epoch freeze BN and observers; end_epoch (if set) freezes both.
finalize() leaves the fake-quant structure on the model: ``sparsify.export`` reads it
(``quantization_state`` + ``strip_fake_quant``).

A calibration-only recipe (no training after start_epoch) is honoured by export:
``modifier.calibrate(model, batches)`` runs ``sparsify.quant.calibrate`` with this modifier's
scheme, ignore list, method and num_calibration_steps.

scheme FP16 inserts nothing during training; it tells export to write FP16 (see
docs/quantization.md for which ops stay FP32).

SparseML: ``from_sparseml(fields, at)`` maps a ``!QuantizationModifier`` onto this class; it is
called by ``sparsify/sparseml.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from sparsify import quant
from sparsify.errors import RecipeError
from sparsify.modifiers.base import EPS, Modifier, SessionState, runtime

SCHEME_PRESETS: dict[str, dict] = {
    "W8A8": {"weights": {"num_bits": 8, "symmetric": True, "strategy": "channel"},
             "input_activations": {"num_bits": 8, "symmetric": False, "strategy": "tensor"}},
    "W8A8_TENSOR": {"weights": {"num_bits": 8, "symmetric": True, "strategy": "tensor"},
                    "input_activations": {"num_bits": 8, "symmetric": False,
                                          "strategy": "tensor"}},
    "FP16": {},
}
_ARG_KEYS = {"num_bits", "symmetric", "strategy", "type", "dynamic", "observer"}


def _check_args(where: str, args: Any, symmetric_ok: tuple[bool, ...],
                strategies: tuple[str, ...]) -> dict:
    if not isinstance(args, dict):
        raise ValueError(f"{where} must be a mapping with num_bits, symmetric, strategy")
    extra = set(args) - _ARG_KEYS
    if extra:
        raise ValueError(f"{where}.{sorted(extra)[0]} is not a scheme field "
                         f"(use num_bits, symmetric, strategy)")
    if args.get("num_bits", 8) != 8:
        raise ValueError(f"{where}.num_bits = {args['num_bits']}: only 8-bit quantization is "
                         f"implemented (use 8, or scheme FP16)")
    if args.get("type", "int") != "int":
        raise ValueError(f"{where}.type = {args['type']!r}: only integer quantization (int)")
    if args.get("dynamic", False):
        raise ValueError(f"{where}.dynamic = true: dynamic (runtime) activation scales are not "
                         f"implemented; use static scales (dynamic: false)")
    if args.get("symmetric", symmetric_ok[0]) not in symmetric_ok:
        raise ValueError(f"{where}.symmetric = {args['symmetric']}: only "
                         f"{' or '.join(map(str, symmetric_ok))} is implemented")
    if args.get("strategy", strategies[0]) not in strategies:
        raise ValueError(f"{where}.strategy = {args['strategy']!r}: use one of {strategies}")
    return args


def parse_scheme(scheme: Union[str, dict]) -> dict:
    """A preset name or an explicit mapping -> the normalized mapping (ValueError if we can't)."""
    if isinstance(scheme, str):
        key = scheme.upper()
        if key not in SCHEME_PRESETS:
            raise ValueError(f"unknown scheme preset {scheme!r}; use one of "
                             f"{', '.join(SCHEME_PRESETS)} or an explicit mapping")
        return copy.deepcopy(SCHEME_PRESETS[key])
    if not isinstance(scheme, dict):
        raise ValueError("scheme must be a preset name or a mapping")
    extra = set(scheme) - {"weights", "input_activations", "output_activations"}
    if extra:
        raise ValueError(f"scheme.{sorted(extra)[0]} is not a scheme field "
                         f"(use weights, input_activations)")
    if scheme.get("output_activations") is not None:
        raise ValueError("scheme.output_activations: output scales are chosen by sparsify "
                         "(where onnxruntime needs them); leave it null")
    w = _check_args("scheme.weights", scheme.get("weights", {}), (True,), ("channel", "tensor"))
    a = _check_args("scheme.input_activations", scheme.get("input_activations", {}),
                    (False, True), ("tensor",))
    return {"weights": {"num_bits": 8, "symmetric": True,
                        "strategy": w.get("strategy", "channel")},
            "input_activations": {"num_bits": 8, "symmetric": a.get("symmetric", False),
                                  "strategy": "tensor"}}


class Quantization(Modifier):
    """INT8 QAT / calibration or FP16 (see the module docstring)."""

    scheme: Union[str, dict] = "W8A8"
    ignore: list[str] = Field(default_factory=list)
    targets: Optional[list[str]] = None
    freeze_bn_stats_epoch: Optional[float] = None
    disable_quantization_observer_epoch: Optional[float] = None
    num_calibration_steps: Optional[int] = Field(default=None, ge=1)
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)

    started_: bool = runtime(False)
    calib_start_step_: Optional[int] = runtime(None)
    calibrating_: bool = runtime(False)
    observers_frozen_: bool = runtime(False)
    bn_frozen_: bool = runtime(False)

    @field_validator("scheme")
    @classmethod
    def _valid_scheme(cls, v: Any) -> Any:
        parse_scheme(v)
        return v

    @field_validator("ignore", "targets", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("targets")
    @classmethod
    def _all(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        # __ALL__ / __ALL_PRUNABLE__ (SparseML): every Conv2d and Linear, i.e. the default
        return None if v is not None and set(v) <= {"__ALL__", "__ALL_PRUNABLE__"} else v

    @field_validator("freeze_bn_stats_epoch", "disable_quantization_observer_epoch")
    @classmethod
    def _never(cls, v: Optional[float]) -> Optional[float]:
        return None if v is not None and v < 0 else v  # SparseML's -1 = never

    @model_validator(mode="after")
    def _check_epochs(self) -> "Quantization":
        for name in ("freeze_bn_stats_epoch", "disable_quantization_observer_epoch"):
            v = getattr(self, name)
            if v is not None and v < self.start_epoch:
                raise ValueError(f"{name} ({v:g}) is before start_epoch ({self.start_epoch:g})")
        return self

    # -- what export needs ---------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """"int8" or "fp16": the export format this modifier asks for."""
        return "fp16" if isinstance(self.scheme, str) and self.scheme.upper() == "FP16" else "int8"

    def quant_scheme(self) -> quant.QuantScheme:
        s = parse_scheme(self.scheme)
        return quant.QuantScheme(
            weight_per_channel=s["weights"]["strategy"] == "channel",
            act_symmetric=s["input_activations"]["symmetric"])

    def calibrate(self, model, batches: Iterable) -> dict:
        """Calibration-only INT8 (used by export): returns quantization_state(model)."""
        return quant.calibrate(model, batches, method=self.method,
                               num_batches=self.num_calibration_steps,
                               percentile=self.percentile, scheme=self.quant_scheme(),
                               ignore=self.ignore)

    # -- lifecycle -----------------------------------------------------------------------------
    def initialize(self, state: SessionState) -> None:
        if self.precision == "fp16":
            return
        try:
            quant.select_modules(state.model, self.targets, self.ignore)
        except RecipeError as err:
            raise RecipeError(f"{state.source}: {self.label}: {err}") from None

    def on_step_end(self, state: SessionState) -> None:
        if self.precision == "fp16" or state.epoch < self.start_epoch - EPS:
            return
        model = state.model
        if not self.started_:
            self._start(state)
        if self.calibrating_:
            self._calibration_step(state)
        if (not self.bn_frozen_ and self._reached(state, self.freeze_bn_stats_epoch)):
            quant.freeze_bn_stats(model)
            self.bn_frozen_ = True
        if (not self.observers_frozen_ and not self.calibrating_
                and self._reached(state, self.disable_quantization_observer_epoch)):
            quant.set_observing(model, False)
            self.observers_frozen_ = True
        if self.end_epoch >= 0 and state.epoch >= self.end_epoch - EPS:
            if not self.bn_frozen_:
                quant.freeze_bn_stats(model)
                self.bn_frozen_ = True
            if not self.observers_frozen_ and not self.calibrating_:
                quant.set_observing(model, False)
                self.observers_frozen_ = True

    @staticmethod
    def _reached(state: SessionState, epoch: Optional[float]) -> bool:
        return epoch is not None and state.epoch >= epoch - EPS

    def _start(self, state: SessionState) -> None:
        try:
            quant.prepare(state.model, self.quant_scheme(), self.targets, self.ignore)
        except RecipeError as err:
            raise RecipeError(f"{state.source}: {self.label}: {err}") from None
        self.started_ = True
        if self.num_calibration_steps:
            self.calibrating_ = True
            self.calib_start_step_ = state.step
            for aq in quant.act_quants(state.model):
                aq.ema = False
            quant.set_quantizing(state.model, False)
        if self.bn_frozen_:
            quant.freeze_bn_stats(state.model)
        if self.observers_frozen_:
            quant.set_observing(state.model, False)

    def _calibration_step(self, state: SessionState) -> None:
        done = state.step - (self.calib_start_step_ or 0)
        n = self.num_calibration_steps or 0
        half = math.ceil(n / 2)
        observers = quant.act_quants(state.model)
        if self.method != "minmax" and done == half:
            for aq in observers:
                aq.observing = False
                if aq.initialized:
                    aq.start_histogram()
        if done < n:
            return
        for aq in observers:
            if aq.hist is not None:
                lo, hi = aq.hist_range
                if self.method == "percentile":
                    lo, hi = quant.scales.percentile_range(aq.hist, lo, hi, self.percentile)
                else:
                    lo, hi = quant.scales.entropy_range(aq.hist, lo, hi)
                aq.set_range(lo, hi)
            aq.stop_histogram()
            aq.ema = True
        self.calibrating_ = False
        quant.set_quantizing(state.model, True)
        quant.set_observing(state.model, not self.observers_frozen_)
        if self.method != "minmax":
            # the calibrated ranges hold; EMA would drift them back towards min/max
            quant.set_observing(state.model, False)
            self.observers_frozen_ = True

    def finalize(self, state: SessionState) -> None:
        if self.started_:
            quant.set_observing(state.model, False)
            self.observers_frozen_ = True

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started_, "calib_start_step": self.calib_start_step_,
                "calibrating": self.calibrating_, "observers_frozen": self.observers_frozen_,
                "bn_frozen": self.bn_frozen_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the structure itself is re-inserted by on_step_end (start_epoch is already reached)
        self.started_ = False
        self.calib_start_step_ = state["calib_start_step"]
        self.observers_frozen_ = state["observers_frozen"]
        self.bn_frozen_ = state["bn_frozen"]


QuantizationModifier = Quantization


def from_sparseml(fields: dict, at: str = "QuantizationModifier") -> list[dict]:
    """Translate a SparseML ``!QuantizationModifier`` into native recipe items.

    Called by ``sparsify/sparseml.py``. Mapping: start_epoch (-1 -> 0), end_epoch,
    scheme (presets / explicit mapping, validated), ignore, freeze_bn_stats_epoch,
    disable_quantization_observer_epoch (-1 -> never), num_calibration_steps;
    ``submodules`` -> targets; ``exclude_module_types`` -> ignore (type names);
    ``activation_bits``/``weight_bits`` must be 8. ``model_fuse_fn_name`` is dropped (fusion is
    automatic); ``quantize_embeddings: true`` cannot be honoured (embeddings stay FP32) and, like
    any other unknown field, is a RecipeError naming the field.
    """
    fields = dict(fields)
    out: dict = {"type": "Quantization"}
    start = fields.pop("start_epoch", -1)
    out["start_epoch"] = 0.0 if start == -1 else start
    end = fields.pop("end_epoch", -1)
    if end != -1:
        out["end_epoch"] = end
    fields.pop("update_frequency", None)
    for key in ("scheme", "ignore", "freeze_bn_stats_epoch",
                "disable_quantization_observer_epoch", "num_calibration_steps"):
        if key in fields and fields[key] is not None:
            out[key] = fields.pop(key)
        fields.pop(key, None)
    for key in ("activation_bits", "weight_bits"):
        if key in fields and fields.pop(key) != 8:
            raise RecipeError(f"{at}: field {key!r}: only 8-bit quantization is implemented")
    if fields.get("quantize_embeddings"):
        raise RecipeError(f"{at}: field 'quantize_embeddings': embeddings stay FP32 in sparsify; "
                          f"set it to false or remove it")
    fields.pop("quantize_embeddings", None)
    if fields.get("submodules"):
        out["targets"] = [f"re:{s}(\\..*)?" for s in fields.pop("submodules")]
    if fields.get("exclude_module_types"):
        out["ignore"] = list(out.get("ignore", [])) + list(fields.pop("exclude_module_types"))
    fields.pop("model_fuse_fn_name", None)
    fields.pop("model_fuse_fn_kwargs", None)
    fields.pop("exclude_batchnorm", None)
    if fields:
        key = next(iter(fields))
        raise RecipeError(f"{at}: field {key!r} cannot be honoured by sparsify; remove it "
                          f"(supported: start_epoch, end_epoch, scheme, ignore, submodules, "
                          f"exclude_module_types, freeze_bn_stats_epoch, "
                          f"disable_quantization_observer_epoch, num_calibration_steps)")
    return [out]
