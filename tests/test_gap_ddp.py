"""GeneralizationGapMonitor under DDP (2 processes): the numbers of one process on the same data."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from lightning_reg import GeneralizationGapMonitor
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs


class _SaveAfterGap(pl.Callback):
    """Placed after the monitor: saves its values, its subset indices and the validated weights."""

    def __init__(self, root: str, gap: GeneralizationGapMonitor) -> None:
        self.root, self.gap = root, gap

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        torch.save(
            {
                "train_eval": {k: metrics[f"reg/train_eval/{k}"].item() for k in ("loss", "acc")},
                "indices": list(self.gap._loader.dataset.indices),
                "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
            },
            f"{self.root}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("subset_size", "batchnorm"),
    [
        (101, False),  # odd: ranks get 51 and 50 samples
        # 33 and 32 samples in batches of 32: unbalanced, rank 0 would run one batch more, and
        # BatchNorm buffers make the DDP wrapper's forward a collective
        (65, True),
    ],
)
def test_ddp_train_eval_equals_a_single_process_evaluation(tmp_path, subset_size, batchnorm):
    pl.seed_everything(0, verbose=False)
    dm = BlobsDataModule(label_noise=0.2)
    gap = GeneralizationGapMonitor(subset_size=subset_size, seed=5, batch_size=32)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[gap, _SaveAfterGap(str(tmp_path), gap)],
    ))  # fmt: skip
    trainer.fit(TinyClassifier(batchnorm=batchnorm), datamodule=dm)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # the subset is split without duplicates and covers the seeded subset exactly
    order = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(5))
    expected = order[:subset_size]
    assert not set(r0["indices"]) & set(r1["indices"])
    assert sorted(r0["indices"] + r1["indices"]) == sorted(expected.tolist())

    # both ranks log the same values, equal to one process evaluating the whole subset
    assert r0["train_eval"] == pytest.approx(r1["train_eval"], rel=1e-6)
    model = TinyClassifier(batchnorm=batchnorm)
    model.load_state_dict(r0["state"])
    model.eval()
    x, y = (torch.stack(t) for t in zip(*Subset(dm.train_set, expected.tolist()), strict=True))
    with torch.no_grad():
        logits = model(x)
    assert r0["train_eval"]["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    acc = (logits.argmax(-1) == y).float().mean().item()
    assert r0["train_eval"]["acc"] == pytest.approx(acc, abs=1e-6)
