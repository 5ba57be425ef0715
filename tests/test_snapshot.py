"""Unit tests of the one-copy module snapshot behind EarlyStopping."""

import pytest
import torch
from torch import nn

from lightning_reg._snapshot import StateSnapshot, module_state
from tests.helpers import same_state


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("cache", torch.ones(3), persistent=False)


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for _, t in module_state(module):
            t.add_(1) if t.is_floating_point() else t.add_(3)


def test_tied_parameters_once_and_non_persistent_buffers_skipped():
    names = [name for name, _ in module_state(Tied())]
    assert names.count("embed.weight") == 1 and "head.weight" not in names
    assert "norm.running_mean" in names and "norm.num_batches_tracked" in names
    assert "cache" not in names


@pytest.mark.parametrize("location", ["cpu", "device", "disk"])
def test_capture_restore_round_trip(tmp_path, location):
    model = Tied()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = StateSnapshot(location, tmp_path / "snap.pt")
    snapshot.capture(model)
    _perturb(model)
    assert not same_state(model.state_dict(), expected)
    snapshot.restore(model)
    assert same_state(model.state_dict(), expected)
    assert model.head.weight is model.embed.weight  # restored in place, ties intact


def test_capture_reuses_its_buffers_and_holds_one_copy():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    snapshot = StateSnapshot("cpu")
    snapshot.capture(model)
    pointers = {k: t.data_ptr() for k, t in snapshot._tensors.items()}
    _perturb(model)
    snapshot.capture(model)
    assert pointers == {k: t.data_ptr() for k, t in snapshot._tensors.items()}
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert snapshot.nbytes == state_bytes


def test_copy_is_independent_of_live_weights():
    model = nn.Linear(3, 3)
    snapshot = StateSnapshot("cpu")
    snapshot.capture(model)
    before = snapshot.state_dict()["weight"].clone()
    _perturb(model)
    assert torch.equal(snapshot.state_dict()["weight"], before)


def test_disk_write_is_atomic_and_clear_removes_the_file(tmp_path):
    path = tmp_path / "dir" / "best.pt"
    snapshot = StateSnapshot("disk", path)
    snapshot.capture(nn.Linear(2, 2))
    assert path.exists() and not path.with_name("best.pt.tmp").exists()
    assert torch.load(path, weights_only=True).keys() == {"weight", "bias"}
    snapshot.clear()
    assert not path.exists() and snapshot.empty


def test_state_dict_round_trip_between_locations(tmp_path):
    model = Tied()
    source = StateSnapshot("cpu")
    source.capture(model)
    target = StateSnapshot("disk", tmp_path / "x.pt")
    target.load_state_dict(source.state_dict())
    _perturb(model)
    target.restore(model)
    assert same_state(dict(module_state(model)), source.state_dict())


def test_restore_errors_are_explicit():
    with pytest.raises(RuntimeError, match="snapshot is empty"):
        StateSnapshot("cpu").restore(nn.Linear(2, 2))
    snapshot = StateSnapshot("cpu")
    snapshot.capture(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="has shape"):
        snapshot.restore(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="tensors changed"):
        snapshot.restore(nn.Linear(2, 2, bias=False))


def test_bad_locations():
    with pytest.raises(ValueError, match="Unknown snapshot location"):
        StateSnapshot("gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a file path"):
        StateSnapshot("disk")
