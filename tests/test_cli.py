"""The CLI: every user error is one line on stderr, exit status 2, no traceback."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsify import cli
from sparsify.checkpoint import save_checkpoint
from sparsify.models import create_model

REPO = Path(__file__).resolve().parents[1]
RECIPE = """
modifiers:
  - type: MagnitudePruning
    params: [Linear]
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
"""


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture
def files(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    torch.manual_seed(0)
    good = save_checkpoint(tmp_path / "lenet.pt", create_model("lenet", image_size=8).state_dict())
    wrong = save_checkpoint(tmp_path / "resnet.pt", create_model("resnet18").state_dict())
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"fc.weight": Payload()}, f, protocol=2)
    return {"recipe": recipe, "good": good, "wrong": wrong, "evil": evil, "dir": tmp_path}


def apply_args(files, checkpoint, *extra):
    return ["apply", "--recipe", str(files["recipe"]), "--checkpoint", str(checkpoint),
            "--model", "lenet", "--data", "digits", "--out", str(files["dir"] / "out"),
            "--no-progress", *extra]


def one_line_error(capsys, argv, pattern):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]
    return lines[0]


def test_missing_checkpoint(capsys, files):
    one_line_error(capsys, apply_args(files, files["dir"] / "nope.pt"),
                   r"checkpoint .*nope\.pt does not exist")


def test_demo_threads_must_be_positive(capsys):
    one_line_error(capsys, ["demo", "--threads", "0"], r"--threads must be a positive integer")


def test_checkpoint_that_does_not_fit_the_model(capsys, files):
    line = one_line_error(capsys, apply_args(files, files["wrong"]),
                          r"does not fit model LeNet: missing keys: features\.0\.weight")
    assert "unexpected keys: conv1.weight" in line


def test_pickle_that_carries_code_is_refused(capsys, files):
    one_line_error(capsys, apply_args(files, files["evil"]),
                   r"refused to load .*evil\.pt: it is a pickle that would import and call print")
    assert "this must never run" not in capsys.readouterr().out


def test_unknown_model_and_dataset(capsys, files):
    argv = apply_args(files, files["good"])
    argv[argv.index("lenet")] = "lenet7"
    one_line_error(capsys, argv, r"unknown model 'lenet7'; choose one of .*resnet18")
    argv = apply_args(files, files["good"])
    argv[argv.index("digits")] = "cifar10"
    one_line_error(capsys, argv, r"unknown dataset 'cifar10'")


def test_bad_recipe_is_one_line(capsys, files):
    bad = files["dir"] / "bad.yaml"
    bad.write_text("modifiers:\n  - type: MagnitudePruning\n    final_sparsty: 0.5\n")
    argv = apply_args(files, files["good"])
    argv[argv.index(str(files["recipe"]))] = str(bad)
    one_line_error(capsys, argv, r"bad\.yaml.*final_sparsty")


def test_argparse_errors_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["apply", "--recipe", "r.yaml"])
    assert exc.value.code != 0
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code != 0


def test_apply_then_analyze(capsys, files):
    assert cli.main(apply_args(files, files["good"], "--batch-size", "128")) == 0
    out = capsys.readouterr().out
    assert "val top-1" in out and "model.pt" in out
    model_pt = files["dir"] / "out" / "model.pt"
    assert cli.main(["analyze", str(model_pt), "--model", "lenet", "--data", "digits",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = {x["name"]: x for x in report["layers"]}
    assert layers["classifier.1.weight"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert layers["features.0.weight"]["sparsity"] == 0.0
    assert cli.main(["analyze", str(model_pt)]) == 0
    assert "classifier.3.weight" in capsys.readouterr().out


def test_every_command_has_help(capsys):
    parser = cli.build_parser()
    for name, (add, run) in cli.COMMANDS.items():
        assert run.__doc__, name
    assert parser.parse_args(["demo"]).command == "demo"
    # the help renders, for the tool and for each command (the demo's says "90%", which
    # argparse would take for a format directive if it were not escaped)
    for argv in (["--help"], *([name, "--help"] for name in cli.COMMANDS)):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0, argv
        out = capsys.readouterr().out
        assert out.startswith("usage: sparsify"), argv
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "prune it to 90%, compare accuracy, export it and check it on the engine" in top
    for name in cli.COMMANDS:
        assert name in top


def test_real_process_prints_one_line_and_exits_2(files, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify.cli", *apply_args(files, tmp_path / "missing.pt")],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: checkpoint ")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("extra,pattern", [
    (["--device", "bogus"], r"--device 'bogus' is not a device name"),
    (["--lr", "nan"], r"--lr\) must be a finite number > 0, got nan"),
    (["--momentum", "-1"], r"--momentum must be a finite number >= 0"),
    (["--weight-decay", "-1"], r"--weight-decay must be a finite number >= 0"),
    (["--seed", "99999999999999999999999"], r"--seed must be an integer from 0 to 4294967295"),
])
def test_bad_apply_arguments_are_one_line_and_leave_no_folder(capsys, files, extra, pattern):
    one_line_error(capsys, apply_args(files, files["good"], *extra), pattern)
    assert not (files["dir"] / "out").exists()


def test_apply_out_under_a_file_is_one_line(capsys, files):
    (files["dir"] / "afile.txt").write_text("x")
    argv = apply_args(files, files["good"])
    argv[argv.index(str(files["dir"] / "out"))] = str(files["dir"] / "afile.txt" / "sub")
    one_line_error(capsys, argv, r"--out .*afile\.txt/sub: .*afile\.txt is a file")


def apply_with_recipe(files, name: str, text: str) -> list[str]:
    """apply's arguments with the recipe replaced by ``text``, written to ``name``."""
    recipe = files["dir"] / name
    recipe.write_text(text)
    argv = apply_args(files, files["good"])
    argv[argv.index(str(files["recipe"]))] = str(recipe)
    return argv


def test_apply_failing_on_the_model_or_recipe_leaves_no_folder(capsys, files):
    one_line_error(capsys, apply_args(files, files["wrong"]), r"does not fit model LeNet")
    argv = apply_with_recipe(files, "nothing.yaml", RECIPE.replace("[Linear]", "[no_such_layer]"))
    one_line_error(capsys, argv, r"nothing\.yaml: modifier #1 \(MagnitudePruning\): target "
                                 r"'no_such_layer' matches no")
    assert not (files["dir"] / "out").exists()


def test_recipe_field_error_names_the_file_and_modifier(capsys, files):
    argv = apply_with_recipe(files, "badval.yaml", RECIPE.replace("0.5", "abc"))
    one_line_error(capsys, argv, r"badval\.yaml: modifier #1 \(MagnitudePruning\): field "
                                 r"'final_sparsity' = 'abc'")


def test_demo_out_that_is_a_file_fails_before_training(capsys, files, monkeypatch):
    from sparsify import demo

    def no_training(*args, **kwargs):
        raise AssertionError("the baseline must not be trained or loaded")

    monkeypatch.setattr(demo, "baseline_checkpoint", no_training)
    one_line_error(capsys, ["demo", "--out", str(files["recipe"]), "--no-engine"],
                   r"--out .*r\.yaml is a file")
    one_line_error(capsys, ["demo", "--recipe", str(files["dir"] / "nope.yaml"), "--no-engine"],
                   r"recipe file .*nope\.yaml does not exist")
