"""Export a (pruned, possibly quantized) PyTorch model to standard ONNX, checked before it is kept.

``export(model, path, sample_input, format=...)``:

1. copies the model, folds BatchNorm into the convs (``sparsify.quant.strip_fake_quant``, which
   for INT8 also puts the weights on their int8 grid), and for INT8 without QAT state calibrates
   on ``calibration_data`` first;
2. exports with torch's ``torch.export``-based ONNX exporter (opset 18, dynamic batch), restores
   parameter names on the initializers the exporter's optimizer renamed, and converts the graph:
   FP16 (float16 initializers, float32 I/O), or INT8 QDQ (``sparsify.qdq.to_qdq``);
3. writes the file to a temporary path next to ``path``, runs every check of
   ``sparsify.export_checks`` on that file, and only then renames it onto ``path``. Any failure
   raises ``ExportError`` and leaves no file behind.

See docs/export.md for formats, tolerances and the dtype policy.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from torch import nn

from sparsify import export_checks as checks
from sparsify import export_graph as graph
from sparsify.errors import ExportError, SparsifyError
from sparsify.export_graph import read_metadata  # noqa: F401  (public API)
from sparsify.fileio import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("fp32", "fp16", "int8")
# torch's exporter implements opset 18 and up; its down-conversion to 17 fails on ReduceMean
MIN_OPSET = 18
DEFAULT_OPSET = 18
# the newest opset torch's exporter writes itself; newer ones go through onnx's version
# converter, which fails on its graphs (and the file would keep the older opset)
try:
    from torch.onnx._constants import ONNX_MAX_OPSET as MAX_OPSET
except ImportError:  # a torch without the constant: the opset it was released with
    MAX_OPSET = 23
CHECK_BATCH = 16  # the second batch size every export is run at (the first is the sample's)
EXTRA_CHECK_BATCHES = 2
# weights of these modules are the ones whose zeros are counted and checked
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


@dataclass
class ExportReport:
    path: Path
    format: str
    opset: int
    file_size: int
    # name -> fraction of zeros, and (zeros, elements), read back from the written file
    sparsity: dict[str, float]
    zeros: dict[str, tuple[int, int]]
    checked: bool
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    top1_agreement: float | None = None  # vs the check reference (fake-quant torch for INT8)
    top1_vs_float: float | None = None  # INT8: vs the model as given (FP32 unless QAT)
    check_rows: int = 0
    check_batch_sizes: list[int] = field(default_factory=list)
    quantization: str | None = None  # "qat" or "calibration" for INT8
    fallbacks: list[str] = field(default_factory=list)
    # weights with zeros the model did not have (int8 rounding, BN channels with gamma == 0)
    new_zeros: dict[str, int] = field(default_factory=dict)
    compressed: bool = False
    dense_file_size: int | None = None  # what the file would weigh without compression
    timings: dict[str, float] = field(default_factory=dict)
    # whether onnxruntime ran the file with its graph optimizations (fused int8 kernels) in the
    # check; False for INT8 on x86 CPUs without VNNI (see export_checks.fused_int8_exact)
    check_optimized: bool = True

    @property
    def overall_sparsity(self) -> float:
        total = sum(n for _, n in self.zeros.values())
        return sum(z for z, _ in self.zeros.values()) / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["overall_sparsity"] = self.overall_sparsity
        return d

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, opset {self.opset}, "
                 f"{self.file_size / 1e6:.2f} MB"
                 + (f", {self.dense_file_size / 1e6:.2f} MB uncompressed" if self.compressed
                    else "") + ")",
                 f"weights: {len(self.zeros)} layers, {100 * self.overall_sparsity:.2f}% zeros"]
        if self.checked:
            lines.append(f"checked: onnx.checker, onnxruntime on batches {self.check_batch_sizes}"
                         f", max rel error {self.max_rel_error:.2e}, top-1 agreement "
                         f"{100 * self.top1_agreement:.1f}% ({self.check_rows} rows)"
                         + (f", {100 * self.top1_vs_float:.1f}% vs the float model"
                            if self.top1_vs_float is not None else ""))
        if self.quantization:
            lines.append(f"int8 from {self.quantization}")
        lines += [f"kept FP32: {f}" for f in self.fallbacks]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs and arguments


def _as_inputs(sample_input: Any) -> tuple[torch.Tensor, ...]:
    items = sample_input if isinstance(sample_input, (tuple, list)) else (sample_input,)
    if not items or not all(isinstance(x, torch.Tensor) for x in items):
        raise ExportError(f"sample_input must be a Tensor or a tuple of Tensors, got "
                          f"{type(sample_input).__name__}")
    if any(x.dim() == 0 for x in items):
        raise ExportError("sample_input needs a batch dimension (dim 0); got a scalar tensor")
    return tuple(x.detach().cpu() for x in items)


def _check_output_path(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory; give a file name such as "
                          f"{path / 'model.onnx'}")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist; create it "
                          f"first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: directory {parent} is not writable; choose "
                          f"another --out")


def _recipe(recipe: Any):
    if recipe is None:
        return None
    if hasattr(recipe, "modifiers") and hasattr(recipe, "text"):
        return recipe
    from sparsify.recipe import load_recipe

    return load_recipe(recipe)


def _int8_modifier(recipe):
    """The recipe's INT8 Quantization modifier, or None."""
    if recipe is None:
        return None
    from sparsify.modifiers.quantization import Quantization

    return next((m for m in recipe.modifiers
                 if isinstance(m, Quantization) and m.precision == "int8"), None)


def _calibration_only(recipe, modifier) -> bool:
    # nothing trains after fake quantization is inserted: export calibrates instead of QAT
    return modifier.start_epoch >= recipe.end_epoch - 1e-6


def _outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], what: str) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as err:  # any failure here is the input not fitting the model
        shapes = [list(x.shape) for x in inputs]
        raise ExportError(f"{type(model).__name__} does not run on {what} of shape "
                          f"{shapes[0] if len(shapes) == 1 else shapes}: "
                          f"{str(err).strip().splitlines()[0]}") from err
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise ExportError(f"{type(model).__name__} must return a Tensor or a tuple of Tensors "
                          f"to be exported, got {type(out).__name__}")
    return [o.detach().float().numpy() for o in outs]


def _extra_batches(inputs: tuple[torch.Tensor, ...], n: int) -> list[tuple[torch.Tensor, ...]]:
    """Random batches like the sample: same dtype, mean and spread (token ids: same range)."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        batch = []
        for x in inputs:
            shape = (max(x.shape[0], 8),) + tuple(x.shape[1:])
            if x.is_floating_point():
                std = float(x.std()) if x.numel() > 1 else 1.0
                batch.append((torch.randn(shape, generator=gen) * (std or 1.0)
                              + float(x.mean())).to(x.dtype))
            else:
                lo, hi = int(x.min()), int(x.max())
                batch.append(torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype))
        out.append(tuple(batch))
    return out


def _first_input(batch: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)  # (inputs, labels) as a DataLoader yields it
    raise ExportError(f"calibration batches must be Tensors or (input, label) tuples, got "
                      f"{type(batch).__name__}")


# ---------------------------------------------------------------------------------------------
# torch -> ONNX


# their INFO lines narrate every optimizer pass
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and warns about things we handle; send it to the log."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in _EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buf), \
            contextlib.redirect_stderr(buf):
        warnings.simplefilter("always")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            for w in caught:
                log.debug("exporter warning: %s", w.message)
            for line in buf.getvalue().splitlines():
                if line.strip():
                    log.debug("exporter: %s", line)


def _torch_to_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int,
                   input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    # torch.export specializes a dimension of size 1, so the batch traced must be >= 2
    example = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in inputs)
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in inputs)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model, example, None, dynamo=True, opset_version=opset, optimize=True,
                input_names=input_names, output_names=output_names, dynamic_shapes=dynamic,
                verbose=False, report=False, external_data=False)
    except Exception as err:  # the exporter raises many untyped errors; name the model
        raise ExportError(f"torch.onnx.export failed on {type(model).__name__}: "
                          f"{str(err).strip().splitlines()[0][:400]}") from err
    proto = program.model_proto
    graph.clean(proto)
    return proto


# ---------------------------------------------------------------------------------------------
# model preparation


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    """name -> FP32 weight of every Conv/Linear (the tensors whose zeros we count)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_MODULES) and m.weight is not None:
            out[f"{name}.weight" if name else "weight"] = (
                m.weight.detach().float().cpu().numpy().copy())
    return out


def _prepare_int8(work: nn.Module, recipe, calibration_data, method: str,
                  inputs: tuple[torch.Tensor, ...]) -> tuple[str, list]:
    """Give ``work`` calibrated or QAT fake quantization; returns (mode, extra check batches)."""
    from sparsify import quant

    extra: list = []
    if getattr(work, "_sparsify_quant", None) is not None:
        quant.set_observing(work, False)
        quant.set_quantizing(work, True)
        return "qat", extra
    modifier = _int8_modifier(recipe)
    if modifier is not None and not _calibration_only(recipe, modifier):
        where = f" {recipe.path}" if getattr(recipe, "path", None) else ""
        raise ExportError(
            f"recipe{where} trains with quantization (Quantization modifier from epoch "
            f"{modifier.start_epoch:g} to {recipe.end_epoch:g}), so its checkpoint holds QAT "
            f"scales, but the model has no quantization structure (no observers or scales). "
            f"Build it before loading the weights: sparsify.export.model_from_checkpoint("
            f"checkpoint, model_name, recipe) does (the CLI does it with --recipe); to "
            f"calibrate instead, export without the recipe.")
    batches = list(calibration_data) if calibration_data is not None else [inputs[0]]
    if not batches:
        raise ExportError("calibration_data is empty: give at least one batch of inputs")
    what = (f"{len(batches)} calibration batches" if calibration_data is not None
            else "the sample input (pass calibration_data for a better range estimate)")
    log.info("format int8: the model has no QAT state; calibrating activations with %s on %s",
             method, what)
    data = [_first_input(b)[0] for b in batches]
    try:
        if modifier is not None:  # a calibration-only recipe: its scheme, ignore and method
            modifier.calibrate(work, data)
        else:
            quant.calibrate(work, data, method=method)
    except SparsifyError as err:
        raise ExportError(f"INT8 calibration failed: {err}") from err
    if calibration_data is not None:  # real data checks INT8 better than random batches
        extra = [_first_input(b) for b in batches[:EXTRA_CHECK_BATCHES]]
    return "calibration", extra


def model_from_checkpoint(checkpoint: str | os.PathLike, model: str, recipe: Any = None,
                          data: str | None = None, num_classes: int | None = None
                          ) -> tuple[nn.Module, torch.Tensor]:
    """(model with the checkpoint's weights, a batch-1 sample input) for export.

    ``data`` (a dataset name, or "imagenet") sets the input shape and class count; the
    default is the model's shipped task. When ``recipe`` trains with INT8 quantization and the
    checkpoint holds its scales, the fake-quant structure is rebuilt first so they load.
    """
    from sparsify import quant
    from sparsify.checkpoint import load_checkpoint, load_into
    from sparsify.data import dataset_shape
    from sparsify.models import MODELS, TEXT_DEFAULTS, create_model, sample_input

    if model not in MODELS:
        raise ExportError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 1):
        raise ExportError(f"--num-classes (num_classes) must be a positive integer, got "
                          f"{num_classes!r}; leave it out to use the dataset's class count")
    if data is None:
        data = "movie_reviews" if MODELS[model][1] is TEXT_DEFAULTS else "mnist"
    classes, kwargs = ((1000, {"in_channels": 3, "image_size": 224}) if data == "imagenet"
                       else dataset_shape(data))
    net = create_model(model, num_classes=classes if num_classes is None else num_classes,
                       **kwargs)
    state = load_checkpoint(checkpoint)
    recipe = _recipe(recipe)
    modifier = _int8_modifier(recipe)
    has_scales = any(k.endswith("input_quant.scale") for k in state)
    if has_scales and modifier is None:
        raise ExportError(f"checkpoint {checkpoint} holds fake-quantization scales "
                          f"(*.input_quant.*): pass the recipe it was fine-tuned with (--recipe) "
                          f"so the quantization structure is rebuilt before loading")
    if has_scales:
        quant.prepare(net, modifier.quant_scheme(), modifier.targets, modifier.ignore)
    load_into(net, state, checkpoint)
    if has_scales:
        quant.set_observing(net, False)
        quant.set_quantizing(net, True)
    return net.eval(), sample_input(model, batch_size=1, **kwargs)


# ---------------------------------------------------------------------------------------------
# the export


def export(model: nn.Module, path: str | os.PathLike, sample_input: Any, format: str = "fp32",
           recipe: Any = None, calibration_data: Iterable | None = None,
           calibration_method: str = "minmax", compress_sparse: bool = False,
           opset: int = DEFAULT_OPSET, check: bool = True) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` in ``format`` ("fp32", "fp16" or "int8").

    ``sample_input``: a Tensor (or tuple of Tensors) with a batch dimension; it fixes every
    other dimension. ``recipe``: the recipe the model was fine-tuned with (a Recipe, a path or
    YAML text), stored in the file's metadata. ``calibration_data``: input batches (Tensors or
    (input, label) tuples) used to calibrate INT8 when the model has no QAT state. With
    ``check`` (the default) the file is kept only if it passes every check in
    ``sparsify.export_checks``. Raises ExportError, leaving no file, on any failure.
    """
    fmt = format.lower() if isinstance(format, str) else format
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if (isinstance(opset, bool) or not isinstance(opset, int)
            or not MIN_OPSET <= opset <= MAX_OPSET):
        raise ExportError(f"opset {opset!r} is not supported: torch's exporter writes opsets "
                          f"{MIN_OPSET} to {MAX_OPSET}; pass --opset (opset=) in that range")
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    _check_output_path(path)
    inputs = _as_inputs(sample_input)
    recipe = _recipe(recipe)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    from sparsify import quant

    original = copy.deepcopy(model).cpu().eval()
    sample_ref = _outputs(original, inputs, "the sample input")
    work, reference, mode, extra, qstate = original, original, None, [], None
    if fmt == "int8":
        work = reference = copy.deepcopy(original)
        mode, extra = _prepare_int8(work, recipe, calibration_data, calibration_method, inputs)
        try:
            qstate = quant.quantization_state(work)
        except SparsifyError as err:
            raise ExportError(f"cannot read the quantization state: {err}") from err
    exported = quant.strip_fake_quant(work).eval()
    lap("prepare")

    input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    output_names = (["output"] if len(sample_ref) == 1
                    else [f"output_{i}" for i in range(len(sample_ref))])
    proto = _torch_to_onnx(exported, inputs, opset, input_names, output_names)
    params = {n: t.detach().cpu().numpy() for n, t in exported.state_dict().items()
              if t.is_floating_point()}
    aliases = graph.restore_names(proto, params)
    lap("torch_export")

    fallbacks: list[str] = []
    if fmt == "fp16":
        proto = graph.to_fp16(proto, quant.FP16_KEEP_FP32_OPS)
    elif fmt == "int8":
        from sparsify.qdq import to_qdq

        try:
            proto = to_qdq(proto, qstate)
        except SparsifyError as err:
            raise ExportError(f"INT8 QDQ conversion failed: {err}") from err
        fallbacks = graph.int8_fallbacks(qstate, proto)
    lap("convert")

    expected = {aliases.get(n, n): w for n, w in _weights(exported).items()}
    given = {aliases.get(n, n): w for n, w in _weights(original).items()}
    if check:
        checks.check_onnx(proto)
    counts, new_zeros = checks.check_sparsity(proto, expected, given, fmt)
    graph.set_metadata(proto, {
        "version": _version(), "format": fmt,
        "io_dtype": "float32 inputs and outputs" + (", float16 inside" if fmt == "fp16" else ""),
        "recipe": recipe.text if recipe is not None else None,
        "sparsity": {n: {"zeros": z, "elements": e, "sparsity": round(z / e, 6) if e else 0.0}
                     for n, (z, e) in counts.items()},
        "quantization": None if fmt != "int8" else {
            "mode": mode, "method": calibration_method if mode == "calibration" else None,
            "activations": "uint8 asymmetric per tensor",
            "weights": "int8 symmetric per output channel", "fallbacks": fallbacks},
    })
    dense_size = proto.ByteSize()
    # the weight initializers as stored: parameter names, or the int8 tensors behind a DQ
    moved = (graph.compress_weights(proto, checks.weight_arrays(proto)) if compress_sparse
             else [])
    lap("metadata")

    report = ExportReport(path=path, format=fmt, opset=opset, file_size=0,
                          sparsity={n: (z / e if e else 0.0) for n, (z, e) in counts.items()},
                          zeros=counts, checked=check, quantization=mode, fallbacks=fallbacks,
                          new_zeros=new_zeros, compressed=bool(moved),
                          dense_file_size=dense_size if moved else None, timings=timings)
    try:
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
            lap("write")
            if check:
                _check_file(tmp, report, reference, original, inputs, extra, expected, given,
                            bool(moved))
                lap("check")
            report.file_size = tmp.stat().st_size
    except OSError as err:
        raise ExportError(f"cannot write {path}: {err.strerror or err}") from err
    log.info("exported %s (%s, %.2f MB)", path, fmt, report.file_size / 1e6)
    return report


def _check_file(tmp: Path, report: ExportReport, reference: nn.Module, original: nn.Module,
                inputs: tuple[torch.Tensor, ...], extra: list, expected: dict, given: dict,
                compressed: bool) -> None:
    """Every check on the file as written; fills the report's error and agreement fields."""
    written = onnx.load(str(tmp))
    if compressed:
        # shape inference does not read sparse initializers: the full check ran on the dense
        # graph before compression, the structural one runs here
        try:
            onnx.checker.check_model(written)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"onnx.checker rejected the compressed file: {err}") from err
    counts, _ = checks.check_sparsity(written, expected, given, report.format)
    if counts != report.zeros:
        raise ExportError("sparsity check: zero counts read back from the written file differ "
                          "from the exported graph's")
    # an INT8 file is checked for what it computes; where onnxruntime's fused int8 kernels
    # saturate (x86 without VNNI), they would measure the CPU rather than the file
    report.check_optimized = report.format != "int8" or checks.fused_int8_exact()
    if not report.check_optimized:
        log.warning("onnxruntime's fused int8 kernels add products in saturating int16 on this "
                    "CPU (x86 without VNNI), so %s is checked as written (graph optimizations "
                    "off); its fused results here may differ from the fake-quantized model",
                    report.path)
    session = checks.ort_session(tmp, optimize=report.check_optimized)
    batches = [inputs, tuple(torch.from_numpy(x) for x in checks.expand_batch(
        tuple(x.numpy() for x in inputs), CHECK_BATCH))]
    batches += extra or _extra_batches(inputs, EXTRA_CHECK_BATCHES)
    refs = [_outputs(reference, b, "a check batch") for b in batches]
    floats = ([_outputs(original, b, "a check batch") for b in batches]
              if report.format == "int8" else None)
    scored = [True, False] + [True] * (len(batches) - 2)  # batch 16 repeats the sample
    result = checks.compare_outputs(session, [tuple(x.numpy() for x in b) for b in batches],
                                    refs, report.format, floats=floats, scored=scored)
    report.max_abs_error = result.max_abs_error
    report.max_rel_error = result.max_rel_error
    report.top1_agreement = result.top1_agreement
    report.top1_vs_float = result.top1_vs_float
    report.check_rows = result.rows
    report.check_batch_sizes = result.batch_sizes
    checks.enforce_tolerance(result, report.format)


def _version() -> str:
    from sparsify import __version__

    return __version__


def calibration_batches(data: str, num_batches: int = 8, batch_size: int = 32,
                        seed: int = 0) -> list[torch.Tensor]:
    """``num_batches`` input batches drawn (seeded) from the train split of dataset ``data``."""
    from sparsify.data import load_dataset

    for flag, value in (("--calibration-batches (num_batches)", num_batches),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"{flag} must be a positive integer, got {value!r}")
    dataset = load_dataset(data, "train")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)[:num_batches * batch_size].tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [dataset[i][0] for i in order[start:start + batch_size]]
        batches.append(torch.stack(rows))
    return batches


class _CallableModule(types.ModuleType):
    """``sparsify.export`` names both this module and its main function: once the module is
    imported, Python binds the package attribute to the module, so the module itself must be
    callable for ``sparsify.export(model, ...)`` to keep working."""

    def __call__(self, *args, **kwargs) -> ExportReport:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
