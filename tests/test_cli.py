"""LightningCLI: the whole callback stack from YAML (examples/cli.py + examples/cli_config.yaml).

Every public callback must be configurable as ``class_path``/``init_args`` with non-default
arguments (what a YAML user writes), and the example config must train end to end.
"""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_reg
from lightning_reg import (
    CalibrationMonitor,
    EarlyStopping,
    GeneralizationGapMonitor,
    LabelSmoothing,
    MCDropoutPrediction,
    MembershipInferenceAudit,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    SharpnessAwareMinimization,
    SpectralNormalization,
    StochasticDepth,
    WeightDecayExclusion,
)

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "examples" / "cli.py"
CONFIG = ROOT / "examples" / "cli_config.yaml"
STACK = [
    "lightning_reg.EarlyStopping",
    "lightning_reg.WeightDecayExclusion",
    "lightning_reg.Mixup",
    "lightning_reg.GeneralizationGapMonitor",
    "lightning_reg.RegularizationMonitor",
]


def get_xy(batch):
    """A ``get_batch`` function referenced from YAML by its import path."""
    return batch["x"], batch["y"]


def set_xy(batch, x, y):
    batch["x"], batch["y"] = x, y  # in place, as `set_batch` must


def _callback(yaml_text: str) -> Callback:
    """Parse and instantiate one callback the way LightningCLI does for ``trainer.callbacks``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=Callback)
    cfg = parser.parse_string(yaml_text)
    # the dumped config (what LightningCLI saves as config.yaml) must parse back to the same
    assert parser.parse_string(parser.dump(cfg)) == cfg
    return parser.instantiate(cfg).callback


def _attr(obj, dotted: str):
    for name in dotted.split("."):
        obj = obj[name] if isinstance(obj, dict) else getattr(obj, name)
    return obj


# one entry per public callback: YAML init_args with non-default values -> expected attributes
CASES = {
    EarlyStopping: (
        """
        monitor: val_acc
        mode: max
        patience: 7
        min_delta: 0.01
        restore_best_weights: false
        restore_on_exception: false
        snapshot_to: disk
        snapshot_dir: /tmp/snapshots
        checkpoint_snapshot: false
        start_from_epoch: 2
        baseline: 0.5
        """,
        {
            "monitor": "val_acc",
            "mode": "max",
            "patience": 7,
            "min_delta": 0.01,  # Lightning stores it signed by mode: +0.01 for "max"
            "restore_best_weights": False,
            "restore_on_exception": False,
            "snapshot_to": "disk",
            "snapshot_dir": "/tmp/snapshots",
            "checkpoint_snapshot": False,
            "start_from_epoch": 2,
            "baseline": 0.5,
        },
    ),
    WeightDecayExclusion: (
        """
        exclude: ["*pos_embed", "head.*"]
        exclude_embeddings: true
        exclude_1d: false
        use_no_weight_decay_hook: false
        warn_coupled_l2: false
        verbose: false
        """,
        {
            "rules.exclude": ["*pos_embed", "head.*"],
            "rules.exclude_embeddings": True,
            "rules.exclude_1d": False,
            "rules.use_no_weight_decay_hook": False,
            "warn_coupled_l2": False,
            "verbose": False,
        },
    ),
    Mixup: (
        """
        mixup_alpha: 0.8
        cutmix_alpha: 1.0
        cutmix_minmax: [0.2, 0.8]
        prob: 0.9
        switch_prob: 0.3
        mode: elem
        correct_lam: false
        label_smoothing: 0.1
        num_classes: 10
        off_fraction: 0.9
        keep_targets: true
        seed: 3
        get_batch: tests.test_cli.get_xy
        set_batch: tests.test_cli.set_xy
        """,
        {
            "options.mixup_alpha": 0.8,
            "options.cutmix_alpha": 1.0,
            "options.cutmix_minmax": (0.2, 0.8),
            "options.prob": 0.9,
            "options.switch_prob": 0.3,
            "options.mode": "elem",
            "options.correct_lam": False,
            "label_smoothing": 0.1,
            "num_classes": 10,
            "off_fraction": 0.9,
            "keep_targets": True,
            "seed": 3,
            "adapter.get_batch": "get_xy",
            "adapter.set_batch": "set_xy",
        },
    ),
    LabelSmoothing: (
        """
        smoothing: 0.2
        num_classes: 10
        keep_targets: true
        input_key: image
        target_key: 1
        """,
        {
            "smoothing": 0.2,
            "num_classes": 10,
            "keep_targets": True,
            "adapter.input_key": "image",
            "adapter.target_key": 1,
        },
    ),
    GeneralizationGapMonitor: (
        """
        subset_size: 200
        metrics: [loss, acc]
        monitor: loss
        higher_is_better: [acc]
        batch_size: 32
        seed: 1
        window: 3
        patience: 2
        log_text: false
        """,
        {
            "subset_size": 200,
            "metrics": ["loss", "acc"],
            "monitor": "loss",
            "higher_is_better": {"acc"},
            "batch_size": 32,
            "seed": 1,
            "window": 3,
            "patience": 2,
            "log_text": False,
        },
    ),
    RegularizationMonitor: (
        """
        per_layer: true
        include_1d: true
        sparsity_tolerance: 0.001
        histogram_every_n_epochs: 5
        """,
        {
            "per_layer": True,
            "include_1d": True,
            "sparsity_tolerance": 0.001,
            "histogram_every_n_epochs": 5,
        },
    ),
    MembershipInferenceAudit: (
        """
        subset_size: 300
        every_n_evals: 2
        seed: 7
        """,
        {"subset_size": 300, "every_n_evals": 2, "seed": 7},
    ),
    ProximalSparsity: (
        """
        l1: 0.001
        l2: 0.01
        penalty: elastic_net
        warmup_steps: 100
        exclude: ["*.head.*"]
        """,
        {"l1": 0.001, "l2": 0.01, "penalty": "elastic_net", "warmup_steps": 100},
    ),
    SharpnessAwareMinimization: (
        """
        rho: 0.5
        adaptive: true
        interval: 2
        """,
        {"rho": 0.5, "adaptive": True, "interval": 2},
    ),
    SpectralNormalization: (
        """
        modules: ["net.*"]
        types: [torch.nn.Linear, torch.nn.Conv2d]
        n_power_iterations: 2
        log_unconstrained: true
        remove_at_end: true
        """,
        {
            "modules": ["net.*"],
            "types": (torch.nn.Linear, torch.nn.Conv2d),
            "n_power_iterations": 2,
            "log_unconstrained": True,
            "remove_at_end": True,
        },
    ),
    CalibrationMonitor: (
        """
        subset_size: 256
        n_bins: 10
        num_classes: 10
        logits_fn: tests.test_calibration.logits_from_dict
        input_key: x
        target_key: y
        batch_size: 128
        seed: 3
        val_dataloader_idx: 1
        """,
        {
            "subset_size": 256,
            "n_bins": 10,
            "num_classes": 10,
            "adapter.input_key": "x",
            "adapter.target_key": "y",
            "batch_size": 128,
            "seed": 3,
            "val_dataloader_idx": 1,
            "logits_fn.__name__": "logits_from_dict",
        },
    ),
    MCDropoutPrediction: (
        """
        num_samples: 30
        max_batch_size: 4096
        seed: 3
        logits_key: scores
        prefix: dropout_
        """,
        {
            "num_samples": 30,
            "max_batch_size": 4096,
            "seed": 3,
            "logits_key": "scores",
            "prefix": "dropout_",
        },
    ),
    StochasticDepth: (
        """
        rate: 0.2
        start_epoch: 2
        warmup_epochs: 5
        blocks: ["model.layer*.*.bn2"]
        seed: 4
        """,
        {
            "rate": 0.2,
            "start_epoch": 2,
            "warmup_epochs": 5,
            "blocks": ["model.layer*.*.bn2"],
            "seed": 4,
        },
    ),
}


def test_cases_cover_every_public_callback():
    public = {
        obj
        for name in lightning_reg.__all__
        if isinstance(obj := getattr(lightning_reg, name), type) and issubclass(obj, Callback)
    }
    assert public == set(CASES)


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_callback_from_class_path_and_init_args(cls):
    init_args, expected = CASES[cls]
    indented = "\n".join("    " + line.strip() for line in init_args.strip().splitlines())
    callback = _callback(
        f"callback:\n  class_path: lightning_reg.{cls.__name__}\n  init_args:\n{indented}\n"
    )
    assert type(callback) is cls
    for dotted, value in expected.items():
        got = _attr(callback, dotted)
        if dotted.startswith("adapter.") and dotted.endswith("_batch"):
            got = got.__name__  # the function the import path names
        assert got == value, dotted


def test_callback_rejects_a_value_outside_its_literal():
    with pytest.raises(Exception, match="snapshot_to"):
        _callback(
            "callback:\n  class_path: lightning_reg.EarlyStopping\n"
            "  init_args:\n    monitor: val_loss\n    snapshot_to: gpu\n"
        )


def _load_cli():
    spec = importlib.util.spec_from_file_location("digits_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_config_prints_the_whole_stack(capsys, monkeypatch):
    cli = _load_cli()
    monkeypatch.setattr(sys, "argv", [str(CLI)])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (None, 0)
    config = yaml.safe_load(capsys.readouterr().out)
    callbacks = config["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == STACK
    args = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in callbacks}
    assert args["EarlyStopping"]["monitor"] == "val_loss"
    assert args["EarlyStopping"]["patience"] == 15
    assert args["EarlyStopping"]["restore_best_weights"] is True
    assert args["Mixup"]["mixup_alpha"] == 1.0
    assert args["Mixup"]["label_smoothing"] == 0.1
    assert args["Mixup"]["num_classes"] == 10
    assert args["GeneralizationGapMonitor"]["subset_size"] == 500
    assert args["RegularizationMonitor"]["per_layer"] is True
    assert config["model"]["dropout"] == 0.3
    assert config["model"]["weight_decay"] == 0.05
    assert config["data"]["label_noise"] == 0.3
    trainer = config["trainer"]
    assert (trainer["max_epochs"], trainer["accelerator"], trainer["devices"]) == (100, "cpu", 1)
    assert trainer["deterministic"] is True
    assert trainer["logger"]["class_path"].endswith("TensorBoardLogger")
    assert trainer["logger"]["init_args"]["save_dir"] == "lightning_logs"
    assert trainer["logger"]["init_args"]["name"] == "cli"


def test_cli_fits_with_the_whole_stack(tmp_path):
    epochs = 3
    command = [
        sys.executable,
        str(CLI.relative_to(ROOT)),
        "fit",
        "--config",
        str(CONFIG.relative_to(ROOT)),
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--model.hidden=32",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"CLI fit, {epochs} epochs: {seconds:.1f} s")

    (log_dir,) = (tmp_path / "cli").iterdir()
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert [c["class_path"] for c in saved["trainer"]["callbacks"]] == STACK

    output = result.stdout + result.stderr
    assert "WeightDecayExclusion, optimizer 0 (AdamW)" in output
    assert "Restored best weights from epoch" in output

    (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
    states = torch.load(checkpoint, weights_only=True)["callbacks"]
    assert any(key.startswith("EarlyStopping") for key in states)
    assert any(key.startswith("Mixup") for key in states)

    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in [
        "val_loss",
        "reg/gap/loss",  # GeneralizationGapMonitor
        "reg/early_stopping/best",  # EarlyStopping
        "reg/mixup/lambda",  # Mixup
        "reg/weights/l2",  # RegularizationMonitor
        "reg/weights_l2/net.0",  # ... per_layer: true
    ]:
        assert tag in scalars, tag
    assert len(events.Scalars("reg/early_stopping/best")) == epochs
    assert len(events.Scalars("reg/gap/loss")) == epochs
    # WeightDecayExclusion split AdamW's one group into a decayed and an undecayed group
    decays = sorted(
        events.Scalars(tag)[-1].value for tag in scalars if tag.startswith("reg/weight_decay/0/")
    )
    assert decays == pytest.approx([0.0, 0.05])
