import pickle

import pytest
import torch
import torch.nn as nn

from sparsify.checkpoint import (check_fit, load_checkpoint, load_into, load_object,
                                 save_checkpoint, save_object)
from sparsify.errors import CheckpointError


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


class Payload:
    """An object whose unpickling would run code (here: harmless, but recorded)."""

    ran = False

    def __reduce__(self):
        return (_run_payload, ())


def _run_payload():
    Payload.ran = True
    return {}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_roundtrip(tmp_path, suffix):
    model = small()
    path = save_checkpoint(tmp_path / f"m{suffix}", model.state_dict(), metadata={"recipe": "x"})
    loaded = load_checkpoint(path)
    assert set(loaded) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    load_into(fresh, loaded, path)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_nested_and_ddp_prefixed_state_dicts(tmp_path):
    sd = small().state_dict()
    torch.save({"epoch": 3, "model": sd}, tmp_path / "a.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        assert set(load_checkpoint(tmp_path / name)) == set(sd)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load .*import and call .*_run_payload on load"):
        load_checkpoint(path)
    assert Payload.ran is False
    # torch.save of an arbitrary object is refused the same way
    torch.save({"weights": small().state_dict(), "obj": Payload()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_object(tmp_path / "evil2.pt")


def test_garbage_and_non_state_dict(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="refused to load .*not a plain weights file"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"a": 1.0}, tmp_path / "nums.pt")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(tmp_path / "nums.pt")


def test_fit_errors_name_missing_unexpected_and_misshaped_keys():
    model = small()
    sd = dict(model.state_dict())
    sd.pop("2.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as err:
        check_fit(model, sd, "ckpt.pt")
    msg = str(err.value)
    assert "ckpt.pt" in msg and "missing keys: 2.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "0.weight (checkpoint (5, 4), model (3, 4))" in msg


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, small().state_dict())
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_object(path, {"x": torch.ones(1)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_foreign_files_and_odd_tensors_are_checkpoint_errors(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("a: 1\n")  # the unpickler trips on this with an IndexError
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*notes\.pt"):
        load_checkpoint(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt"):
        load_checkpoint(empty)
    sparse = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse()}, sparse)
    with pytest.raises(CheckpointError, match="sparse or meta tensors"):
        load_checkpoint(sparse)
    meta = tmp_path / "meta.pt"
    torch.save({"w": torch.empty(3, device="meta")}, meta)
    with pytest.raises(CheckpointError, match="sparse or meta tensors"):
        load_checkpoint(meta)
