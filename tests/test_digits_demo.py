"""The main job runs end to end on a short schedule and writes TensorBoard event files."""

import importlib.util
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_flip_labels_changes_exactly_the_requested_fraction():
    demo = _load_demo()
    import numpy as np

    y = np.arange(1000) % 10
    flipped = demo.flip_labels(y, 0.3, classes=10, seed=0)
    assert (flipped != y).mean() == pytest.approx(0.3)
    assert flipped.min() >= 0 and flipped.max() <= 9


def test_demo_prints_table_and_writes_event_files(tmp_path, capsys):
    demo = _load_demo()
    argv = ["--epochs", "3", "--hidden", "32", "--seeds", "0", "1", "--logdir", str(tmp_path)]
    rows = demo.main(argv)
    out = capsys.readouterr().out
    assert [r["run"] for r in rows] == [run.name for run in demo.runs()] * 2
    assert "train acc (given labels)" in out and "tensorboard --logdir" in out
    assert "Mean over seeds [0, 1]" in out and "test acc std" in out
    assert "test ECE" in out and "test conf-acc" in out
    for row in rows:
        assert 0.0 <= row["test acc"] <= 1.0
        assert 0.0 <= row["test ECE"] <= 1.0 and abs(row["test conf-acc"]) <= row["test ECE"] + 1e-6
    events = list((tmp_path / "digits").rglob("events.out.tfevents.*"))
    assert len(events) == len(rows)


def test_demo_rejects_bad_label_noise(tmp_path):
    demo = _load_demo()
    with pytest.raises(SystemExit):
        demo.parse_args(["--label-noise", "1.5"])
