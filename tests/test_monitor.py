"""RegularizationMonitor: logged weight statistics against an independent computation."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_reg.monitor import RegularizationMonitor, weight_statistics
from tests.helpers import BlobsDataModule, CountScalarReads, TinyClassifier, trainer_kwargs

WEIGHT_KEYS = {"reg/weights/l2", "reg/weights/l1", "reg/weights/sparsity"}
DECAY_KEYS = {"reg/weight_decay/0/pg0", "reg/effective_decay/0/pg0"}


def _fit(tmp_path, model=None, epochs=2, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or TinyClassifier()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, **kwargs))
    trainer.fit(model, datamodule=BlobsDataModule(n_train=128, n_val=32))
    return trainer, model


def _expected(model, include_1d=False, tol=1e-6):
    """The statistics computed directly, in float64, from the model's parameters."""
    params = {
        n: p.detach().double()
        for n, p in model.named_parameters()
        if p.requires_grad and (include_1d or p.ndim >= 2)
    }
    flat = torch.cat([p.flatten() for p in params.values()])
    stats = {
        "reg/weights/l2": flat.norm().item(),
        "reg/weights/l1": flat.abs().sum().item(),
        "reg/weights/sparsity": (flat.abs() <= tol).double().mean().item(),
    }
    for layer in ("net.0", "net.3"):  # TinyClassifier: Linear, ReLU, Dropout, Linear
        layer_params = [p.flatten() for n, p in params.items() if n.startswith(layer + ".")]
        stats[f"reg/weights_l2/{layer}"] = torch.cat(layer_params).norm().item()
    return stats


def _logged(trainer, prefix="reg/"):
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("include_1d", [False, True])
def test_logged_values_match_the_final_weights(tmp_path, include_1d):
    monitor = RegularizationMonitor(per_layer=True, include_1d=include_1d)
    trainer, model = _fit(tmp_path, callbacks=[monitor])
    logged = _logged(trainer)
    expected = _expected(model, include_1d)
    # epoch-level only: no `_step` variants, and exactly the documented keys
    assert set(logged) == set(expected) | DECAY_KEYS
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key
    # the biases moved the norms: include_1d really changes what is measured
    without_bias = _expected(model, include_1d=False)["reg/weights/l2"]
    assert (logged["reg/weights/l2"] > without_bias * (1 + 1e-4)) == include_1d


class _SparseClassifier(TinyClassifier):
    """Known zeros in the weights, and a frozen all-zero layer that must not be counted."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)  # the weights stay exactly as set
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        with torch.no_grad():
            self.frozen.weight.zero_()
            first, last = self.net[0].weight, self.net[3].weight  # 32x16 and 4x32
            first[:4] = 0.0  # 64 exact zeros
            first[4, :4] = torch.tensor([1e-7, -1e-7, 5e-7, -5e-7])  # 4 below the tolerance
            first[5, :4] = torch.tensor([1e-6, -1e-6, 1e-6, -1e-6])  # 4 at the tolerance
            first[6, :4] = 2e-6  # above it
            last[0] = -0.0  # 32 negative zeros


@pytest.mark.parametrize(("tol", "near_zero"), [(1e-6, 64 + 4 + 4 + 32), (0.0, 64 + 32)])
def test_sparsity_counts_zeros_within_the_tolerance(tmp_path, tol, near_zero):
    monitor = RegularizationMonitor(sparsity_tolerance=tol)
    trainer, model = _fit(tmp_path, model=_SparseClassifier(), callbacks=[monitor])
    assert torch.all(model.net[0].weight[:4] == 0)  # lr=0: nothing moved
    sparsity = _logged(trainer)["reg/weights/sparsity"]
    assert sparsity == pytest.approx(near_zero / (512 + 128), rel=1e-6)
    assert sparsity == pytest.approx(_expected(model, tol=tol)["reg/weights/sparsity"], rel=1e-6)


class _TwoGroupClassifier(TinyClassifier):
    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": 0.1, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            ],
            lr=0.01,
        )
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def test_weight_decay_per_param_group_uses_the_epochs_lr(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer, _ = _fit(tmp_path, model=_TwoGroupClassifier(), epochs=3, logger=logger,
                      callbacks=[RegularizationMonitor()])  # fmt: skip
    logged = _logged(trainer)
    assert logged["reg/weight_decay/0/decay"] == pytest.approx(0.1)
    assert logged["reg/weight_decay/0/no_decay"] == 0.0
    assert logged["reg/effective_decay/0/no_decay"] == 0.0
    assert not any("pg" in key for key in logged)
    # the lr each epoch trained with (StepLR halves it after every epoch), times the decay
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["reg/effective_decay/0/decay"]]
    effective = [float(row["reg/effective_decay/0/decay"]) for row in rows]
    assert effective == pytest.approx([0.01 * 0.1, 0.005 * 0.1, 0.0025 * 0.1], rel=1e-6)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.00125)


# ----------------------------------------------------------------------------------- loggers
def test_csv_logger_receives_the_scalars_every_epoch(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = RegularizationMonitor(per_layer=True)
    trainer, model = _fit(tmp_path, epochs=3, logger=logger, callbacks=[monitor])
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["reg/weights/l2"]]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    per_layer = {"reg/weights_l2/net.0", "reg/weights_l2/net.3"}
    assert set(rows[0]) >= per_layer | WEIGHT_KEYS | DECAY_KEYS
    assert float(rows[-1]["reg/weights/l2"]) == pytest.approx(
        _expected(model)["reg/weights/l2"], rel=1e-6
    )
    assert float(trainer.logged_metrics["reg/weights/l1"]) == float(rows[-1]["reg/weights/l1"])


def test_tensorboard_histograms_every_n_epochs(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = RegularizationMonitor(histogram_every_n_epochs=2)
    _fit(tmp_path, epochs=4, logger=logger, callbacks=[monitor])
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    tags = set(events.Tags()["histograms"])
    assert tags == {"reg/weights_hist/net.0.weight", "reg/weights_hist/net.3.weight"}
    steps_per_epoch = 128 // 32
    steps = [e.step for e in events.Histograms("reg/weights_hist/net.0.weight")]
    assert steps == [2 * steps_per_epoch, 4 * steps_per_epoch]  # after epochs 1 and 3
    assert set(events.Tags()["scalars"]) >= WEIGHT_KEYS


def test_histograms_without_tensorboard_are_skipped(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer, _ = _fit(tmp_path, logger=logger,
                      callbacks=[RegularizationMonitor(histogram_every_n_epochs=1)])  # fmt: skip
    assert set(_logged(trainer)) >= WEIGHT_KEYS


# ---------------------------------------------------------------------------------- no syncs
class _StepCounter:
    """Counts scalar reads from the first ``on_train_batch_start`` to the last batch-end hook."""

    def __init__(self) -> None:
        self.mode = CountScalarReads()
        counter = self

        class Enter(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                counter.mode.__enter__()

        class Exit(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                counter.mode.__exit__(None, None, None)

        self.enter, self.exit = Enter(), Exit()


class _SyncsEveryStep(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        float(pl_module.net[0].weight.detach().sum())


def _scalar_reads(tmp_path, *callbacks):
    counter = _StepCounter()
    _fit(tmp_path, callbacks=[counter.enter, *callbacks, counter.exit])
    return counter.mode.count


def test_no_host_device_sync_during_training_steps(tmp_path):
    baseline = _scalar_reads(tmp_path / "a")
    monitor = RegularizationMonitor(per_layer=True, include_1d=True, histogram_every_n_epochs=1)
    assert _scalar_reads(tmp_path / "b", monitor) == baseline
    assert _scalar_reads(tmp_path / "c", _SyncsEveryStep()) > baseline  # the count can fail


# ----------------------------------------------------------------------------- distributed
class _SaveFinal(pl.Callback):
    """Saves each rank's logged reg/ values and final weights (module level: spawn pickles it)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"logged": _logged(trainer), "state": state},
                   f"{self.root}/rank{trainer.global_rank}.pt")  # fmt: skip


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_logs_the_norm_of_the_weights_not_world_size_times_it(tmp_path):
    monitor = RegularizationMonitor(per_layer=True, include_1d=True)
    _fit(tmp_path, devices=2, strategy="ddp_spawn", callbacks=[monitor, _SaveFinal(str(tmp_path))])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["logged"] == ranks[1]["logged"]
    model = TinyClassifier()
    model.load_state_dict(ranks[0]["state"])
    for key, value in _expected(model, include_1d=True).items():
        assert ranks[0]["logged"][key] == pytest.approx(value, rel=1e-6), key


def _full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=g)
    weight[1] = 0.0
    return {
        "fc.weight": weight,  # 5 rows: uneven shards of 3 and 2
        "fc.bias": torch.randn(5, generator=g),
        "tiny.weight": torch.randn(1, 4, generator=g),  # rank 1's shard is empty
        "out.weight": torch.randn(2, 5, generator=g),
    }


def _sharded_worker(rank: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
    try:
        full = _full_tensors()
        shards = [(n, torch.tensor_split(t, 2)[rank]) for n, t in full.items()]
        mesh = init_device_mesh("cpu", (2,))
        dtensors = [
            (n, distribute_tensor(t, mesh, [Shard(0) if n != "out.weight" else Replicate()]))
            for n, t in full.items()
        ]
        results = {
            "plain_shards": weight_statistics(shards, per_layer=True, sharded=True),
            "dtensors": weight_statistics(dtensors, per_layer=True, sharded=True),
            # plain tensors replicated on every rank, e.g. left unsharded by ModelParallelStrategy
            "replicated": weight_statistics(
                full.items(), per_layer=True, sharded=True, plain_replicas=2
            ),
            "ddp": weight_statistics(full.items(), per_layer=True),  # no reduction at all
            "local_only": weight_statistics(shards, per_layer=True),
        }
        torch.save(results, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_sharded_partial_sums_add_up_to_the_full_statistics(tmp_path):
    mp.spawn(_sharded_worker, args=(str(tmp_path),), nprocs=2)
    full = _full_tensors()
    expected = weight_statistics(full.items(), per_layer=True)
    flat = torch.cat([t.flatten().double() for t in full.values()])
    assert expected["reg/weights/l2"] == pytest.approx(flat.norm().item(), rel=1e-6)
    assert expected["reg/weights/sparsity"] == pytest.approx(3 / flat.numel())
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case in ("plain_shards", "dtensors", "replicated", "ddp"):
            assert results[case] == pytest.approx(expected, rel=1e-6), (rank, case)
        # without the reduction each rank sees only its part (the test can fail)
        assert results["local_only"]["reg/weights/l2"] < expected["reg/weights/l2"] - 0.1


def test_empty_selection_logs_only_the_decay(tmp_path):
    frozen = TinyClassifier()
    frozen.net[0].requires_grad_(False)
    frozen.net[3].weight.requires_grad_(False)  # only net.3.bias trains
    with pytest.warns(UserWarning, match="include_1d=True"):
        trainer, _ = _fit(tmp_path, model=frozen, callbacks=[RegularizationMonitor()])
    assert set(_logged(trainer)) == DECAY_KEYS
    assert weight_statistics([]) == {}


# -------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sparsity_tolerance=-1e-3), "sparsity_tolerance"),
        (dict(sparsity_tolerance=math.nan), "sparsity_tolerance"),
        (dict(histogram_every_n_epochs=0), "histogram_every_n_epochs"),
        (dict(histogram_every_n_epochs=-2), "histogram_every_n_epochs"),
        (dict(histogram_every_n_epochs=1.5), "histogram_every_n_epochs"),
        (dict(histogram_every_n_epochs=True), "histogram_every_n_epochs"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegularizationMonitor(**kwargs)


def test_regularization_settings():
    monitor = RegularizationMonitor(per_layer=True, sparsity_tolerance=0.0)
    assert monitor.regularization_settings() == {
        "RegularizationMonitor/per_layer": True,
        "RegularizationMonitor/include_1d": False,
        "RegularizationMonitor/sparsity_tolerance": 0.0,
        "RegularizationMonitor/histogram_every_n_epochs": None,
    }


def test_norms_of_long_tensors_are_exact_to_rounding():
    # torch's CPU float32 vector_norm drifts on long vectors (-3.5e-5 of the L2 norm of a
    # resnet18 512x512x3x3 kernel, percents at 5e7 elements); the monitor adds chunked norms
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 512, 3, 3, generator=g) * 0.02
    stats = weight_statistics([("conv.weight", weight)], per_layer=True)
    exact = weight.double()
    assert stats["reg/weights/l2"] == pytest.approx(float(exact.norm()), rel=1e-7)
    assert stats["reg/weights/l1"] == pytest.approx(float(exact.abs().sum()), rel=1e-7)
    assert stats["reg/weights_l2/conv"] == stats["reg/weights/l2"]
