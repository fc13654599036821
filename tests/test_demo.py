"""The demo's pieces: shipped-recipe lookup, baseline cache, the whole flow on a small model."""

import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify import demo
from sparsify.errors import InputError
from sparsify.models import create_model

torch.set_num_threads(1)

SMALL_RECIPE = """
modifiers:
  - type: MagnitudePruning
    params: [Conv2d, Linear]
    ignore: ["features.0"]
    final_sparsity: 0.9
    start_epoch: 0
    end_epoch: 1
    update_frequency: 0.5
"""


def test_shipped_recipe_is_found_and_prunes_all_but_the_first_conv():
    path = demo.find_recipe(demo.DEMO_RECIPE)
    assert path.name == "resnet18_mnist_prune90.yaml" and path.is_file()
    recipe = sparsify.load_recipe(path)
    model = create_model("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=10)
    expected = {f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv1"}
    # at step 0 the cubic schedule starts at 0%: claimed, not yet pruned
    assert set(session.sparsity()) == expected
    session.finalize()


def test_missing_recipe_is_an_input_error():
    with pytest.raises(InputError, match="no_such.yaml.*--recipe"):
        demo.find_recipe("no_such.yaml")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path / "c"))
    assert demo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPARSIFY_CACHE_DIR")
    assert demo.cache_dir().parts[-2:] == (".cache", "sparsify")


def test_demo_flow_trains_once_then_reuses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "BASELINE", {"model_name": "lenet", "data_name": "digits",
                                           "epochs": 4, "lr": 0.1, "batch_size": 32,
                                           "weight_decay": 0.0})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_RECIPE)
    first = demo.run_demo(recipe=recipe, progress=False, engine=False)
    assert not first.baseline_cached and first.baseline_path.is_file()
    assert first.engine is None and "onnxruntime" not in demo.format_demo(first)
    assert first.dense_top1 > 80.0
    for name, layer in first.layers.items():
        target = 0 if name == "features.0.weight" else round(0.9 * layer["numel"])
        assert abs(layer["zeros"] - target) <= 1, name
    second = demo.run_demo(recipe=recipe, progress=False)
    assert second.baseline_cached and second.dense_top1 == first.dense_top1
    text = demo.format_demo(second)
    assert "cached" in text and "features.3.weight" in text and "90.00%" in text
    assert f"dense {second.dense_top1:.2f}%" in text
    assert (second.out / "model.pt").is_file()
    # step 4: the pruned model exported and run on the engine, timed against onnxruntime
    e = second.engine
    assert e.onnx_path == second.out / "model.onnx" and e.onnx_path.is_file()
    assert e.max_rel_diff < 1e-4 and abs(e.top1 - second.pruned_top1) <= 0.5
    assert e.sparse_layers >= 1 and e.layers >= e.sparse_layers
    assert sorted(e.latency) == [1, 16]
    for t in e.latency.values():
        assert t["engine_ms"] > 0 and t["onnxruntime_ms"] > 0
        assert abs(t["speedup"] - t["onnxruntime_ms"] / t["engine_ms"]) < 1e-9
    assert f"{e.top1:.2f}%" in text or f"{e.top1:.2f}%" in demo.format_demo(second)
    assert "onnxruntime" in demo.format_demo(second)


def test_bad_out_or_recipe_fails_before_the_baseline(monkeypatch, tmp_path):
    from sparsify.errors import RecipeError

    def no_baseline(*args, **kwargs):
        raise AssertionError("the baseline must not be trained or loaded")

    monkeypatch.setattr(demo, "baseline_checkpoint", no_baseline)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_RECIPE)
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    with pytest.raises(InputError, match=r"--out .*afile\.txt is a file"):
        demo.run_demo(recipe=recipe, out=afile, engine=False)
    with pytest.raises(InputError, match=r"--out .*sub: .*afile\.txt is a file, not a directory"):
        demo.run_demo(recipe=recipe, out=afile / "sub", engine=False)
    with pytest.raises(RecipeError, match=r"nope\.yaml does not exist"):
        demo.run_demo(recipe=tmp_path / "nope.yaml", out=tmp_path / "run", engine=False)
    with pytest.raises(InputError, match="--seed"):
        demo.run_demo(recipe=recipe, out=tmp_path / "run", seed=-1, engine=False)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "epoch_1.pt").write_bytes(b"")
    with pytest.raises(InputError, match="already holds a run"):
        demo.run_demo(recipe=recipe, out=tmp_path / "run", engine=False)
