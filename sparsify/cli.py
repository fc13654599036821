"""The ``sparsify`` command line: thin subcommands over the library.

Each command is one pair of functions, ``_add_<cmd>_args(parser)`` and ``_run_<cmd>(args)``,
plus one row in the ``COMMANDS`` table at the bottom of this file. ``_run_<cmd>`` parses nothing
itself: it calls one library function and prints what it returns. The first line of its
docstring is the command's help text.

Errors a user can cause (``sparsify.errors.SparsifyError``) are printed as one line,
``error: <message>``, on stderr with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sparsify.errors import InputError, SparsifyError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------
# apply: fine-tune a checkpoint under a recipe


def _add_apply_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file (native or SparseML)")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="trained weights: a .pt state_dict or a .safetensors file")
    parser.add_argument("--model", required=True, help="architecture name (see docs/training.md)")
    parser.add_argument("--data", required=True, help="dataset name: mnist, digits, movie_reviews")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs to train (default: the recipe's end epoch, rounded up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01,
                        help="initial learning rate (recipe LR modifiers take over where they apply)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last epoch checkpoint in --out")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="how many epoch checkpoints to keep in --out/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")


def _run_apply(args: argparse.Namespace) -> int:
    """Fine-tune a checkpoint under a recipe; writes model.pt, metrics.jsonl, sparsity.json."""
    from sparsify.train import TrainConfig, finetune

    config = TrainConfig(
        model=args.model, data=args.data, out=args.out, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed,
        device=args.device, keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress,
    )
    result = finetune(args.recipe, args.checkpoint, config, resume=args.resume)
    if result.is_writer:
        print(f"val top-1 {result.metrics[-1]['val_top1']:.2f}% after "
              f"{result.metrics[-1]['epoch']} epochs; overall sparsity "
              f"{100 * result.overall_sparsity:.2f}%")
        print(f"wrote {result.model_path}, {result.metrics_path}, {result.sparsity_path}")
    return 0


# ---------------------------------------------------------------------------------------------
# analyze: per-layer sparsity, parameters and FLOPs of a checkpoint or ONNX file


def _add_analyze_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a .pt / .safetensors checkpoint or an .onnx file")
    parser.add_argument("--model", default=None,
                        help="architecture of a checkpoint, needed for FLOPs (e.g. resnet18)")
    parser.add_argument("--data", default=None,
                        help="dataset the model was built for: sets input size and classes "
                             "(mnist, digits, movie_reviews, imagenet; default mnist for image "
                             "models, movie_reviews for the transformer)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_analyze(args: argparse.Namespace) -> int:
    """Per-layer sparsity, parameter counts and dense vs sparse FLOPs of a checkpoint or ONNX."""
    from sparsify.analyze import analyze, format_report

    report = analyze(args.path, model=args.model, data=args.data)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------
# demo: baseline ResNet-18 on MNIST-5k, pruned to 90% by the shipped recipe


def _add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None,
                        help="recipe to apply (default: the shipped resnet18_mnist_prune90.yaml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the pruned run goes (default: a folder in the cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    parser.add_argument("--no-engine", action="store_true",
                        help="stop after pruning: no ONNX export and engine check")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the engine and onnxruntime (default: the engine's)")


def _run_demo(args: argparse.Namespace) -> int:
    """Train (once, cached) a ResNet-18 on MNIST-5k, prune it to 90%, compare accuracy, export
    it and check it on the engine against onnxruntime."""
    from sparsify.demo import format_demo, run_demo

    if args.threads is not None and args.threads <= 0:
        raise InputError(f"--threads must be a positive integer, got {args.threads}")
    result = run_demo(recipe=args.recipe, out=args.out, seed=args.seed,
                      progress=not args.no_progress, engine=not args.no_engine,
                      threads=args.threads)
    print(format_demo(result))
    return 0


# ---------------------------------------------------------------------------------------------
# export: a checkpoint to checked ONNX (FP32, FP16 or INT8 QDQ)


def _add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="weights: a .pt state_dict or .safetensors")
    parser.add_argument("--model", required=True, help="architecture name (see docs/training.md)")
    parser.add_argument("--format", required=True, choices=("fp32", "fp16", "int8"))
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--recipe", default=None,
                        help="the recipe the checkpoint was fine-tuned with (stored in the file; "
                             "needed to load QAT scales)")
    parser.add_argument("--data", default=None,
                        help="dataset the model was built for: sets input shape and classes "
                             "(mnist, digits, movie_reviews, imagenet; default: the model's task)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes, when it differs from the dataset's")
    parser.add_argument("--calibration-data", default=None,
                        help="dataset to calibrate INT8 on when the checkpoint has no QAT scales "
                             "(train split; default: the sample input only)")
    parser.add_argument("--calibration-batches", type=int, default=8,
                        help="batches of 32 to calibrate on")
    parser.add_argument("--calibration-method", default="minmax",
                        choices=("minmax", "percentile", "entropy"))
    parser.add_argument("--compress-sparse", action="store_true",
                        help="store sparse weights as ONNX sparse_initializer (COO) where smaller")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_export(args: argparse.Namespace) -> int:
    """Export a checkpoint to ONNX (fp32/fp16/int8), checked by onnxruntime before it is kept."""
    from sparsify.export import calibration_batches, export, model_from_checkpoint

    model, sample = model_from_checkpoint(args.checkpoint, args.model, recipe=args.recipe,
                                          data=args.data, num_classes=args.num_classes)
    batches = (calibration_batches(args.calibration_data, args.calibration_batches)
               if args.calibration_data else None)
    report = export(model, args.out, sample, format=args.format, recipe=args.recipe,
                    calibration_data=batches, calibration_method=args.calibration_method,
                    compress_sparse=args.compress_sparse, opset=args.opset)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


# ---------------------------------------------------------------------------------------------
# run: an ONNX model on sparsify's CPU engine


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the .onnx file to run")
    parser.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE",
                        help="an input array: FILE.npy (the next model input, in graph order), "
                             "NAME=FILE.npy, or FILE.npz holding arrays named like the inputs; "
                             "repeat for several inputs (none for a model without inputs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="worker threads for the kernels (default: all cores)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the outputs to this .npz file (keys: output names)")


def _run_run(args: argparse.Namespace) -> int:
    """Run an ONNX model on sparsify's CPU engine; prints each output's shape and range."""
    import time

    import numpy as np

    from sparsify.engine import Engine
    from sparsify.engine.engine import read_feeds
    from sparsify.engine.report import format_outputs
    from sparsify.fileio import atomic_path

    engine = Engine(args.model, threads=args.threads)
    feeds = read_feeds(args.input, engine.input_names)
    start = time.perf_counter()
    outputs = engine.run(feeds)
    elapsed = time.perf_counter() - start
    print(format_outputs(engine.output_names, outputs))
    report = engine.report()
    print(f"ran in {1e3 * elapsed:.2f} ms; {report['sparse_layers']} of {report['num_layers']} "
          f"weight layers sparse; {100 * report['fraction_of_native_ops']:.0f}% of ops native")
    if args.output is not None:
        with atomic_path(args.output) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, **dict(zip(engine.output_names, outputs)))
        print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------
# benchmark: the engine against onnxruntime on the same file


def _add_model_and_inputs(parser: argparse.ArgumentParser, purpose: str) -> None:
    """The model, batch, inputs and threads that benchmark and verify share."""
    parser.add_argument("model", type=Path, help=f"the .onnx file to {purpose}")
    parser.add_argument("--batch", type=int, default=1,
                        help="batch size for random inputs (a symbolic first axis; default 1)")
    parser.add_argument("--input", action="append", default=None, metavar="[NAME=]FILE",
                        help="use these arrays instead of random inputs (as for `sparsify run`)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both runtimes (default: all cores)")


def _add_benchmark_args(parser: argparse.ArgumentParser) -> None:
    _add_model_and_inputs(parser, "time")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per runtime (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each block")
    parser.add_argument("--no-onnxruntime", action="store_true", help="time the engine only")
    parser.add_argument("--profile", action="store_true",
                        help="also print the engine's time per op type and its slowest steps")
    parser.add_argument("--top", type=int, default=15, help="steps listed by --profile (default 15)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")


def _run_benchmark(args: argparse.Namespace) -> int:
    """Time an ONNX model on the engine and onnxruntime in the same run (latency, items/s, ratio)."""
    from sparsify.engine.bench import benchmark, format_benchmark
    from sparsify.fileio import atomic_write_text

    for flag, value in (("--batch", args.batch), ("--repeats", args.repeats), ("--top", args.top)):
        if value <= 0:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {args.warmup}")
    feeds = None
    if args.input:
        from sparsify.engine import Engine
        from sparsify.engine.engine import read_feeds

        feeds = read_feeds(args.input, Engine(args.model).input_names)
    result = benchmark(args.model, batch=args.batch, threads=args.threads, repeats=args.repeats,
                       warmup=args.warmup, feeds=feeds, onnxruntime=not args.no_onnxruntime,
                       profile=args.profile)
    print(format_benchmark(result, top=args.top))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _add_verify_args(parser: argparse.ArgumentParser) -> None:
    _add_model_and_inputs(parser, "check")
    parser.add_argument("--per-node", action="store_true",
                        help="also compare every intermediate value both runtimes compute and "
                             "name the first node past the tolerance")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest max|engine - ort| / max|ort| accepted (default 1e-4)")
    parser.add_argument("--data", default=None,
                        help="also run a built-in dataset through both runtimes (as for `apply`): "
                             "top-1 of each and how often they agree")
    parser.add_argument("--split", default="val", choices=("train", "val"),
                        help="the dataset split for --data (default val)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N items of --data")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")


def _run_verify(args: argparse.Namespace) -> int:
    """Compare the engine's outputs (and with --per-node every value) with onnxruntime's on the
    same inputs; exits 1 when an output differs by more than the tolerance."""
    from sparsify.engine import Engine
    from sparsify.engine.verify import format_verify, verify, write_json

    if args.batch <= 0:
        raise InputError(f"--batch must be a positive integer, got {args.batch}")
    if args.input and args.data:
        raise InputError("give --input or --data, not both")
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be a positive integer, got {args.limit}")
    engine = Engine(args.model, threads=args.threads)
    feeds = None
    if args.input:
        from sparsify.engine.engine import read_feeds

        feeds = read_feeds(args.input, engine.input_names)
    result = verify(engine, feeds, batch=args.batch, threads=args.threads,
                    per_node=args.per_node, tolerance=args.tolerance, data=args.data,
                    split=args.split, limit=args.limit)
    print(format_verify(result))
    if args.json is not None:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------------------------
# The command table: name -> (add arguments, run). Add a command by adding one row.

COMMANDS = {
    "apply": (_add_apply_args, _run_apply),
    "analyze": (_add_analyze_args, _run_analyze),
    "demo": (_add_demo_args, _run_demo),
    "export": (_add_export_args, _run_export),
    "run": (_add_run_args, _run_run),
    "benchmark": (_add_benchmark_args, _run_benchmark),
    "verify": (_add_verify_args, _run_verify),
}


def _summary(run) -> str | None:
    """A command's help: its function's first docstring paragraph on one line, with '%'
    escaped (argparse formats help strings with %)."""
    if not run.__doc__:
        return None
    paragraph = run.__doc__.strip().split("\n\n")[0]
    return " ".join(paragraph.split()).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsify",
        description="Prune and quantize PyTorch models with YAML recipes, export ONNX, "
                    "run it on a sparse CPU engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, run) in COMMANDS.items():
        help_text = _summary(run)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command_parser)
        command_parser.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with status 2 on bad arguments
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except SparsifyError as err:
        # one line: a message that spans lines would read like a traceback
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
