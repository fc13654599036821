"""The engine: load an ONNX model once into a plan, then run it on any batch size.

    engine = Engine("model.onnx", threads=2)
    (logits,) = engine.run({"input": x})        # like onnxruntime's session.run(None, feeds)
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from sparsify.engine import kernels
from sparsify.engine.plan import Plan, build_plan
from sparsify.errors import EngineError, InputError, SparsifyError


def load_model(source) -> onnx.ModelProto:
    """An ONNX ModelProto from a path or a ModelProto, with typed errors for bad files."""
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "the given ModelProto"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        where = str(path)
        if path.is_dir():
            raise EngineError(f"{path} is a directory; give the path of an .onnx file")
        if not path.is_file():
            raise EngineError(f"ONNX file {path} does not exist")
        try:
            model = onnx.load(str(path))
        except (DecodeError, ValueError, OSError, RuntimeError,
                onnx.checker.ValidationError) as err:
            # ValidationError: external data missing or outside the model's folder
            raise EngineError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err}); "
                              "is the file truncated or of another format, or is its external "
                              "data file missing?") from None
    else:
        raise InputError("the model must be a path to an .onnx file or an onnx.ModelProto, "
                         f"got {type(source).__name__}")
    if not model.HasField("graph") or not model.graph.output or model.ir_version <= 0:
        raise EngineError(f"{where} is not an ONNX model (no graph, outputs or IR version); "
                          "is the file truncated or of another format?")
    return model


# an upper bound for Engine(threads=...): the core takes a C int, and far more threads than
# cores only slows a run down
MAX_THREADS = 1024


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class Engine:
    """Runs an ONNX graph with sparsify's kernels; the plan is built once, here.

    ``threads``: worker threads for the C++ kernels (None: the core's default, all cores).
    ``kind``: "auto" (sparse or dense per layer from its measured sparsity), or force
    "sparse" / "dense" for every packed layer (for comparisons).
    """

    def __init__(self, path_or_model_proto, threads: int | None = None, *, kind: str = "auto"):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads <= 0):
            raise InputError(f"threads must be a positive integer or None, got {threads!r}")
        if threads is not None and threads > MAX_THREADS:
            raise InputError(f"threads must be at most {MAX_THREADS}, got {threads}; "
                             "more threads than cores only slows a run down")
        if kind not in ("auto", "sparse", "dense"):
            raise InputError(f"kind must be 'auto', 'sparse' or 'dense', got {kind!r}")
        self.threads = None if threads is None else int(threads)
        # activations are fresh arrays every run: keep their freed memory for reuse rather than
        # page-faulting it in again (process-wide glibc setting; see kernels.retain_freed_memory)
        kernels.retain_freed_memory()
        self.model = load_model(path_or_model_proto)
        try:
            self.plan: Plan = build_plan(self.model, kind)
        except SparsifyError:
            raise
        except Exception as err:  # a malformed graph that the checks before planning let by
            where = (os.fspath(path_or_model_proto) if isinstance(path_or_model_proto, (str, os.PathLike))
                     else "the given ModelProto")
            raise EngineError(f"{where}: the graph cannot be planned ({type(err).__name__}: {err}); "
                              "does onnx.checker.check_model(model, full_check=True) pass, and does "
                              "onnxruntime load it?") from err
        self.input_names = [name for name, _, _, _ in self.plan.inputs]
        self.output_names = [name for name, _ in self.plan.outputs]
        self._steps = [(s.fn, s.inputs, s.outputs, s.free) for s in self.plan.steps]
        self._out_slots = [slot for _, slot in self.plan.outputs]
        # an output that is a folded constant is copied, so callers cannot alter the plan
        self._const_out = [self.plan.init[slot] is not None for slot in self._out_slots]

    def run(self, feeds: dict, output_names=None) -> list:
        """Outputs as a list in graph order (or in ``output_names`` order)."""
        vals = self._execute(feeds)
        outs = [np.array(vals[s]) if const else np.asarray(vals[s])
                for s, const in zip(self._out_slots, self._const_out)]
        if output_names is None:
            return outs
        if not isinstance(output_names, (list, tuple)) or not all(isinstance(n, str) for n in output_names):
            raise InputError(f"output_names must be a list of output names, got {output_names!r}")
        index = {n: i for i, n in enumerate(self.output_names)}
        unknown = [n for n in output_names if n not in index]
        if unknown:
            raise InputError(f"unknown output name(s) {unknown}; the model's outputs are {self.output_names}")
        return [outs[index[n]] for n in output_names]

    def profile(self, feeds: dict, repeats: int = 10) -> list:
        """Where a run spends its time: one row per plan step, in plan order, with its median wall
        time over ``repeats`` runs after one warm-up run: ``{"name", "op", "ms", "kind",
        "blocks"}``.

        ``op`` names the fused chain (e.g. ``Conv+Add+Relu``); ``kind`` is the layer's kernel
        (sparse / dense / depthwise) for steps that run a packed weight, else None; ``blocks`` is
        ``"4x1"`` where the sparse block kernel runs it, else None. The timer
        around each step adds well under a microsecond per step.
        """
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
            raise InputError(f"repeats must be a positive integer, got {repeats!r}")
        self._execute(feeds)
        times = [[] for _ in self._steps]
        for _ in range(repeats):
            self._execute(feeds, times)
        layers = {row["name"]: row for row in self.plan.layers}
        rows = []
        for step, t in zip(self.plan.steps, times):
            layer = layers.get(step.name.split("+")[0], {})
            rows.append({"name": step.name, "op": step.op, "ms": 1e3 * float(np.median(t)),
                         "kind": layer.get("kind"), "blocks": layer.get("blocks")})
        return rows

    def run_values(self, feeds: dict) -> dict:
        """Every value the plan computes (what fusion left of the graph's intermediate values,
        and its outputs), by value name, each copied as its step wrote it: what
        ``sparsify.engine.verify`` compares node by node with onnxruntime. Fused-away values
        (a Conv's output that its ReLU consumed inside the kernel) are not among them."""
        record: dict = {}
        self._execute(feeds, record=record)
        names = self.plan.value_names
        return {names[slot]: value for slot, value in record.items() if slot in names}

    def _execute(self, feeds: dict, times: list | None = None, record: dict | None = None) -> list:
        """Runs every step; returns the value slots. ``times[k]`` collects step k's durations;
        ``record`` (slot -> array) receives a copy of each step's output as it is written (later
        steps may reuse the buffer in place)."""
        vals = list(self.plan.init)
        for slot, arr in self._checked(feeds):
            vals[slot] = arr
        if self.threads is not None and kernels.get_num_threads() != self.threads:
            kernels.set_num_threads(self.threads)
        clock = time.perf_counter
        k = 0
        try:
            with np.errstate(all="ignore"):  # NaN/Inf inputs propagate like in onnxruntime, silently
                for k, (fn, ins, out, free) in enumerate(self._steps):
                    if times is None:
                        r = fn(*[vals[i] for i in ins])
                    else:
                        start = clock()
                        r = fn(*[vals[i] for i in ins])
                        times[k].append(clock() - start)
                    if out.__class__ is int:
                        vals[out] = r
                    else:
                        for o, v in zip(out, r):
                            vals[o] = v
                    if record is not None:
                        for o in ((out,) if out.__class__ is int else out):
                            record[o] = np.array(vals[o], copy=True)
                    for i in free:
                        vals[i] = None
        except Exception as err:  # a node's op fails: name it, whatever the op raised
            step = self.plan.steps[k]
            shapes = ", ".join(str(list(np.shape(vals[i]))) for i in step.inputs)
            if isinstance(err, MemoryError):
                raise EngineError(f"node {step.name!r} ({step.op}) ran out of memory on inputs of "
                                  f"shapes {shapes}; try a smaller batch") from None
            raise EngineError(f"node {step.name!r} ({step.op}) failed on inputs of shapes {shapes}: "
                              f"{type(err).__name__ + ': ' if not isinstance(err, SparsifyError) else ''}"
                              f"{err}; do the inputs have the sizes the model was exported for, and "
                              "are the node's attributes valid?") from err
        return vals

    def _checked(self, feeds: dict):
        """(slot, array) per graph input, after checking names, dtypes and shapes."""
        if not isinstance(feeds, dict):
            raise InputError(f"feeds must be a dict of input name -> numpy array, got {type(feeds).__name__}")
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if extra:
                parts.append(f"unknown input(s) {extra}")
            raise InputError("; ".join(parts) + f"; the model's inputs are {self.input_names}")
        symbols: dict[str, tuple[str, int]] = {}
        out = []
        for name, slot, dtype, shape in self.plan.inputs:
            arr = feeds[name]
            if isinstance(arr, np.generic):  # a numpy scalar is a 0-d array
                arr = np.asarray(arr)
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input {name!r} must be a numpy array, got {type(arr).__name__}")
            if dtype is not None and arr.dtype != dtype:
                cast = f"np.{dtype.name}" if dtype.kind in "biufc" else f"np.dtype({str(dtype)!r})"
                raise InputError(f"input {name!r} has dtype {arr.dtype}, expected {dtype} "
                                 f"(convert with .astype({cast}))")
            if shape is not None:
                if arr.ndim != len(shape):
                    raise InputError(f"input {name!r} has shape {list(arr.shape)} (rank {arr.ndim}), "
                                     f"expected rank {len(shape)}: {_fmt_shape(shape)}")
                for axis, (got, want) in enumerate(zip(arr.shape, shape)):
                    if isinstance(want, int) and want > 0 and got != want:
                        raise InputError(f"input {name!r} has shape {list(arr.shape)}, expected "
                                         f"{_fmt_shape(shape)} (axis {axis} must be {want})")
                    if isinstance(want, str):
                        seen = symbols.setdefault(want, (name, got))
                        if seen[1] != got:
                            raise InputError(f"input {name!r} has {want}={got} on axis {axis} but input "
                                             f"{seen[0]!r} has {want}={seen[1]}; they must agree")
            out.append((slot, arr))
        return out

    def report(self) -> dict:
        from sparsify.engine.report import plan_report

        return plan_report(self.plan)

    def __repr__(self) -> str:
        return (f"Engine(inputs={self.input_names}, outputs={self.output_names}, "
                f"steps={len(self.plan.steps)}, layers={len(self.plan.layers)})")


def read_feeds(specs: list[str], input_names: list[str]) -> dict:
    """Feeds from CLI-style specs: ``path.npy`` (the next unnamed input, in graph order),
    ``name=path.npy``, or ``path.npz`` (its arrays by input name)."""
    feeds, unnamed = {}, list(input_names)
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = None, spec
        path = Path(file)
        if path.is_dir():
            raise InputError(f"input {path} is a directory; give a .npy or .npz file")
        if not path.is_file():
            raise InputError(f"input file {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            # allow_pickle is off on purpose: an object array could run code when loaded
            reason = ("numpy read it as a pickle, which is never loaded" if "allow_pickle" in str(err)
                      else f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            raise InputError(f"cannot read {path} as a .npy/.npz array file ({reason}); save "
                             "numeric arrays with numpy.save / numpy.savez") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            if name is not None:
                raise InputError(f"{spec}: an .npz file holds named arrays already; pass it without 'name='")
        else:
            if name is None:
                if not unnamed:
                    raise InputError(f"{path}: more input files than model inputs {input_names}")
                name = unnamed[0]
            arrays = {name: data}
        for k, v in arrays.items():
            if k in feeds:
                raise InputError(f"input {k!r} is given twice (last from {path})")
            feeds[k] = v
            if k in unnamed:
                unnamed.remove(k)
    return feeds
