"""The checks every export passes before its file is kept, and sparsity read back from a file.

``check_export`` runs, in order: the ONNX checker (full check, with shape inference), an
onnxruntime session on the written file, outputs against torch on every check batch (batch 1
and 16 among them, so the dynamic batch dimension is exercised), and the zero count of every
weight as stored in the file against the model's. The first failure raises ``ExportError``
naming the check and the numbers; ``sparsify.export`` then deletes the temporary file.

Tolerances (``TOLERANCES``) are relative to the largest reference output: ``max|ort - torch| /
max(1, max|torch|)`` (outputs smaller than 1 are held to the tolerance as an absolute error). FP32 differs from torch only by BN folding and kernel summation order; FP16 rounds
weights and activations to 11 significant bits. INT8 is compared by top-1 agreement with the
fake-quantized torch model (the same arithmetic onnxruntime runs, up to rounding ties): at
least 90% of the rows, or, failing that, agreement with the unquantized model no more than 5
points below the fake-quantized model's own (where quantization noise is large, as for an
ImageNet MobileNetV2 with per-tensor activations, two INT8 implementations split near-ties
differently, yet the file is exactly as accurate as the simulation).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from sparsify.errors import ExportError

log = logging.getLogger(__name__)

# format -> largest allowed max|ort - torch| / max|torch|
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}
# format -> smallest allowed fraction of rows whose arg-max agrees with torch
MIN_TOP1_AGREEMENT = {"int8": 0.9}
# or: INT8 agrees with the float model within this much of the fake-quantized model's agreement
INT8_FLOAT_SLACK = 0.05
# ops whose second input is a weight the engine may run sparse
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass
class CheckResult:
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    top1_agreement: float = 1.0
    rows: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    top1_vs_float: float | None = None  # INT8: onnxruntime vs the unquantized model
    reference_vs_float: float | None = None  # INT8: fake-quant torch vs the unquantized model


# ---------------------------------------------------------------------------------------------
# sparsity read back from a file


def _tensor_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer, dense or sparse (densified), by name."""
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for sp in graph.sparse_initializer:
        dense = np.zeros(tuple(sp.dims), dtype=onnx.helper.tensor_dtype_to_np_dtype(
            sp.values.data_type))
        values = numpy_helper.to_array(sp.values)
        indices = numpy_helper.to_array(sp.indices)
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values
        else:
            dense[tuple(indices.T)] = values
        arrays[sp.values.name] = dense
    return arrays


def weight_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The constant weight of every Conv/Gemm/MatMul, as the runtime sees it before dequantizing.

    Keys are the name the consuming node reads (the DequantizeLinear output for INT8, else the
    initializer). A quantized weight is returned as its integer values minus the zero point, so
    a zero here is a zero after dequantization. Arrays are in torch's layout: a MatMul weight
    (stored [in, out]) and a Gemm weight without transB come back transposed to [out, in].
    """
    graph = model.graph
    arrays = _tensor_arrays(graph)
    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, np.ndarray] = {}
    for node in graph.node:
        idx = WEIGHT_OPS.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name = node.input[idx]
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(
            a.name == "transB" and a.i for a in node.attribute))

        def layout(a: np.ndarray) -> np.ndarray:
            return np.swapaxes(a, -1, -2) if transposed and a.ndim >= 2 else a

        if name in arrays:
            found[name] = layout(arrays[name])
            continue
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in arrays:
            continue  # an activation (attention scores): nothing to count
        q = arrays[dq.input[0]].astype(np.int32)
        if len(dq.input) > 2 and dq.input[2] in arrays:
            zp = arrays[dq.input[2]].astype(np.int32)
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            if zp.ndim == 1 and zp.size > 1:
                shape = [1] * q.ndim
                shape[axis % q.ndim] = -1
                zp = zp.reshape(shape)
            q = q - zp
        found[name] = layout(q)
        found.setdefault(dq.input[0], found[name])
    return found


def zero_counts(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """weight name -> (zeros, elements), read from the file's initializers."""
    return {name: (int(a.size - np.count_nonzero(a)), int(a.size))
            for name, a in weight_arrays(model).items()}


def _lookup(arrays: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    if name in arrays:
        return arrays[name]
    # a quantizer may name the integer tensor after the weight ("conv1.weight_quantized")
    for key, value in arrays.items():
        if key.startswith(name) and key[len(name):len(name) + 1] in ("_", ".", ":"):
            return value
    return None


def check_sparsity(model: onnx.ModelProto, expected: dict[str, np.ndarray],
                   given: dict[str, np.ndarray], fmt: str
                   ) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """Compare each weight in the file with the torch weights it came from.

    ``expected``: the weights as exported (BN folded; for INT8 already on the int8 grid): the
    file must hold zeros at exactly their zero positions. ``given``: the weights of the model
    the caller passed (pruned): each of its zeros must still be a zero in the file. Zeros the
    export added (INT8 rounding of tiny weights, BN channels with gamma = 0) are returned.
    weights are compared in torch's [out, in] layout.
    Returns (weight name -> (zeros in file, elements), weight name -> zeros added).
    """
    arrays = weight_arrays(model)
    counts: dict[str, tuple[int, int]] = {}
    added: dict[str, int] = {}
    for name, ref in expected.items():
        got = _lookup(arrays, name)
        if got is None:
            raise ExportError(f"sparsity check: weight {name!r} has no initializer in the "
                              f"exported file (weights found: {sorted(arrays)[:6]}...)")
        if got.shape != ref.shape:
            raise ExportError(f"sparsity check: weight {name!r} has shape {list(got.shape)} "
                              f"in the file but {list(ref.shape)} in the model")
        got_zero = got == 0
        mismatch = int(np.count_nonzero(got_zero != (ref == 0)))
        if mismatch:
            raise ExportError(
                f"sparsity check ({fmt}): weight {name!r} has {int(got_zero.sum())} zeros in "
                f"the file but {int((ref == 0).sum())} in the exported model ({mismatch} "
                f"positions differ)")
        if name in given and given[name].shape == ref.shape:
            before = given[name] == 0
            lost = int(np.count_nonzero(before & ~got_zero))
            if lost:
                raise ExportError(f"sparsity check ({fmt}): weight {name!r} lost {lost} of the "
                                  f"model's {int(before.sum())} zeros")
            extra = int(np.count_nonzero(got_zero & ~before))
            if extra:
                added[name] = extra
        counts[name] = (int(got_zero.sum()), int(got.size))
    return counts, added


# ---------------------------------------------------------------------------------------------
# onnx checker and onnxruntime against torch


def check_onnx(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0]
        raise ExportError(f"onnx.checker rejected the exported graph: {first}") from err


@functools.lru_cache(maxsize=None)  # the CPU does not change; /proc/cpuinfo is read once
def fused_int8_exact() -> bool:
    """Whether onnxruntime's fused uint8 x int8 kernels compute exactly on this CPU.

    On x86 without VNNI they multiply with AVX2's vpmaddubsw, which adds pairs of products in
    saturating int16 (onnxruntime documents this; its remedy is 7-bit weights, reduce_range):
    on a Zen 3 machine a small transformer's INT8 file came out 27% off the fake-quantized
    model there, while the same file run as written (graph optimizations off) matched to 1e-7.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True  # not Linux: nothing to go on, check as usual
    return "avx512_vnni" in flags or "avx_vnni" in flags


def ort_session(path: Path, threads: int | None = None, optimize: bool = True):
    """An onnxruntime CPU session; ``optimize=False`` runs the graph as written (QDQ nodes as
    float arithmetic, no fused integer kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers are not errors
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
        raise ExportError(f"onnxruntime could not load the exported file: "
                          f"{str(err).strip().splitlines()[0]}") from err


def _top1(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).argmax(axis=1) if a.ndim > 1 else a.reshape(1, -1).argmax(1)


def _agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    rows = sum(len(_top1(x)) for x in a)
    return sum(int((_top1(x) == _top1(y)).sum()) for x, y in zip(a, b)) / max(rows, 1)


def compare_outputs(session, batches: Sequence[tuple[np.ndarray, ...]],
                    references: Sequence[list[np.ndarray]], fmt: str,
                    floats: Sequence[list[np.ndarray]] | None = None,
                    scored: Sequence[bool] | None = None) -> CheckResult:
    """Run ``session`` on every batch and measure it against the torch ``references``.

    ``floats``: for INT8, the unquantized model's outputs (agreement with them is reported).
    ``scored``: which batches count for top-1 agreement (a batch that repeats the sample's rows
    to exercise the batch dimension would only weight those rows more).
    """
    names = [i.name for i in session.get_inputs()]
    scored = list(scored) if scored is not None else [True] * len(batches)
    result = CheckResult()
    got, want, flt = [], [], []
    for k, (inputs, refs) in enumerate(zip(batches, references)):
        feeds = dict(zip(names, inputs))
        try:
            outs = session.run(None, feeds)
        except Exception as err:
            shapes = {n: list(v.shape) for n, v in feeds.items()}
            raise ExportError(f"onnxruntime failed to run the exported file on inputs "
                              f"{shapes}: {str(err).strip().splitlines()[0]}") from err
        result.batch_sizes.append(int(inputs[0].shape[0]) if inputs[0].ndim else 1)
        for i, (out, ref) in enumerate(zip(outs, refs)):
            if out.shape != ref.shape:
                raise ExportError(f"output {i}: onnxruntime gave shape {list(out.shape)}, torch "
                                  f"{list(ref.shape)} (batch {result.batch_sizes[-1]})")
            out = out.astype(np.float64)
            ref = ref.astype(np.float64)
            if not np.all(np.isfinite(out)):
                raise ExportError(f"output {i}: onnxruntime produced non-finite values "
                                  f"(batch {result.batch_sizes[-1]}, format {fmt})")
            err = float(np.abs(out - ref).max()) if out.size else 0.0
            scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1.0)
            result.max_abs_error = max(result.max_abs_error, err)
            result.max_rel_error = max(result.max_rel_error, err / scale)
        if scored[k]:
            got.append(outs[0])
            want.append(refs[0])
            if floats is not None:
                flt.append(floats[k][0])
    result.rows = sum(len(_top1(x)) for x in got)
    result.top1_agreement = _agreement(got, want)
    if floats is not None:
        result.top1_vs_float = _agreement(got, flt)
        result.reference_vs_float = _agreement(want, flt)
    return result


def enforce_tolerance(result: CheckResult, fmt: str) -> None:
    """Raise ExportError when ``result`` is outside the documented tolerance for ``fmt``."""
    tol = TOLERANCES.get(fmt)
    if tol is not None and not result.max_rel_error <= tol:
        raise ExportError(
            f"output check ({fmt}): max |onnxruntime - torch| = {result.max_abs_error:.3g} is "
            f"{result.max_rel_error:.3g} of the largest output, above the {tol:g} tolerance "
            f"(batches {result.batch_sizes})")
    if fmt != "int8":
        return
    # the file must reproduce the fake-quantized torch model, or, where quantization noise
    # makes two INT8 implementations split near-ties differently (1000-class models), be as
    # close to the float model as the fake-quantized model is
    need = MIN_TOP1_AGREEMENT["int8"]
    as_simulated = result.top1_agreement >= need - 1e-12
    as_accurate = (result.top1_vs_float is not None and result.top1_vs_float
                   >= result.reference_vs_float - INT8_FLOAT_SLACK - 1e-12)
    if not (as_simulated or as_accurate):
        vs_float = ("" if result.top1_vs_float is None else
                    f"; with the float model it agrees on {100 * result.top1_vs_float:.1f}% "
                    f"where the fake-quantized model does on "
                    f"{100 * result.reference_vs_float:.1f}%")
        raise ExportError(
            f"output check (int8): top-1 agreement with the fake-quantized torch model is "
            f"{100 * result.top1_agreement:.1f}% over {result.rows} rows, below the "
            f"{100 * need:.0f}% threshold{vs_float} (max |error| {result.max_abs_error:.3g}); "
            f"calibrate on more representative data or leave sensitive layers out with "
            f"`ignore`")


def expand_batch(inputs: tuple[np.ndarray, ...], size: int) -> tuple[np.ndarray, ...]:
    """The rows of ``inputs`` repeated (cycled) to ``size`` rows."""
    out = []
    for x in inputs:
        reps = math.ceil(size / x.shape[0])
        out.append(np.concatenate([x] * reps, axis=0)[:size])
    return tuple(out)
