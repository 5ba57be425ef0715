"""The main job runs end to end on a short schedule and writes TensorBoard event files."""

import importlib.util
import re
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
    out, err = capsys.readouterr()
    assert [r["run"] for r in rows] == [run.name for run in demo.runs()] * 2
    assert "train acc (given labels)" in out and "tensorboard --logdir" in out
    assert "Mean over seeds [0, 1]" in out and "test acc std" in out
    assert "test ECE" in out and "test conf-acc" in out
    for row in rows:
        assert 0.0 <= row["test acc"] <= 1.0
        assert 0.0 <= row["test ECE"] <= 1.0 and abs(row["test conf-acc"]) <= row["test ECE"] + 1e-6
    _check_one_progress_bar(err, runs=len(rows), epochs=3)
    _check_hparams_carry_the_printed_test_metrics(tmp_path / "digits", rows, out)

    # a rerun replaces each run's event files instead of adding to them
    first = sorted((tmp_path / "digits").rglob("events.out.tfevents.*"))
    demo.main(["--epochs", "1", "--hidden", "32", "--seeds", "1", "--logdir", str(tmp_path)])
    assert set(first) - set((tmp_path / "digits").rglob("events.out.tfevents.*")) == {
        p for p in first if p.parent.name.endswith("seed1")
    }


def _check_one_progress_bar(err, runs, epochs):
    """One tqdm bar over every epoch of every run; no Lightning bars, info lines or warnings."""
    total = runs * epochs
    states = [s.strip() for s in err.strip().split("\r") if s.strip()]
    assert "\n" not in err.strip(), err  # tqdm redraws one line; anything else adds lines
    assert all(f"/{total} [" in s for s in states), states  # one bar: the same total throughout
    assert states[-1].startswith(f"run {runs}/{runs} regularized seed 1: 100%|")
    assert f"| {total}/{total} [" in states[-1] and f"epoch {epochs}/{epochs}, val acc" in err
    for noise in ("Epoch 0", "GPU available", "LOCAL_RANK", "Tip:", "GeneralizationGapMonitor"):
        assert noise not in err


def _check_hparams_carry_the_printed_test_metrics(logdir, rows, out):
    """Every run's hparams list the test metrics as metrics, at the values the tables print."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    demo_columns = None
    for row in rows:
        run = logdir / f"{row['run']}-seed{row['seed']}"
        events = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")
        experiment = metadata.parse_experiment_plugin_data(content["_hparams_/experiment"])
        metrics = [info.name.tag for info in experiment.metric_infos]
        assert metrics[:3] == ["test/acc", "test/ece", "test/conf_acc"]
        assert {"reg/gap/loss", "reg/overfitting"} <= set(metrics)
        columns = {info.name for info in experiment.hparam_infos}
        assert demo_columns in (None, columns)  # the same columns in every run (any may be read)
        demo_columns = columns
        start = metadata.parse_session_start_info_plugin_data(
            content["_hparams_/session_start_info"]
        )
        assert start.hparams["recipe"].string_value == row["run"]
        assert start.hparams["seed"].number_value == row["seed"]
        printed = _printed_row(out, row["run"], row["seed"])
        for tag, key in (("test/acc", "test acc"), ("test/ece", "test ECE")):
            (logged,) = events.Scalars(tag)
            assert logged.value == pytest.approx(row[key], abs=1e-7)
            assert f"{logged.value:.3f}" == printed[key]
    assert {"Mixup/mixup_alpha", "EarlyStopping[val_loss]/patience", "dropout"} <= demo_columns


def test_demo_rejects_bad_label_noise(tmp_path):
    demo = _load_demo()
    with pytest.raises(SystemExit):
        demo.parse_args(["--label-noise", "1.5"])


def _printed_row(out, run, seed):
    """The cells of one row of the first printed table (per run and seed), by column name."""
    lines = next(part for part in out.split("\n\n") if "train acc" in part).splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    for line in lines[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[:2] == [run, str(seed)]:
            return dict(zip(header, cells, strict=True))
    raise AssertionError(f"no printed row for {run} seed {seed}")
