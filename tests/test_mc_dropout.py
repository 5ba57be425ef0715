"""MC-dropout: the math against direct formulas, the mode switch, batched vs sequential passes,
real ``trainer.predict`` runs (ours and torchvision's MobileNetV3), DDP and bad input."""

import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import mobilenet_v3_small

from lightning_reg import MCDropoutPrediction, dropout_active, mc_dropout_predict
from lightning_reg.uncertainty import (
    derive_seed,
    mutual_information,
    predictive_entropy,
    seeded_rng,
)
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs


def direct_result(logits_per_pass):
    """The formulas written out: ``logits_per_pass`` is ``(passes, batch, classes)``."""
    probs = torch.softmax(logits_per_pass.double(), -1)
    mean = probs.mean(0)
    entropy = -(mean * torch.log(mean.clamp_min(1e-300))).sum(-1)
    per_pass = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1).mean(0)
    return mean, entropy, entropy - per_pass


def manual_passes(net, x, n, seed, batched=True):
    """MC dropout by hand: eval everywhere, dropout modules in train, seeded global RNG."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    with torch.no_grad(), seeded_rng(seed):
        if batched:
            logits = net(x.repeat(n, 1)).reshape(n, len(x), -1)
        else:
            logits = torch.stack([net(x) for _ in range(n)])
    for m, mode in modes:
        m.training = mode
    return logits


def test_entropy_and_mutual_information_match_the_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, 3, generator=g) * 3
    probs = torch.softmax(logits, -1)
    _, entropy, mi = direct_result(logits)
    assert torch.allclose(predictive_entropy(probs.mean(0)).double(), entropy, atol=1e-6)
    assert torch.allclose(mutual_information(probs).double(), mi, atol=1e-6)
    assert torch.allclose(
        mutual_information(probs.transpose(0, 1), sample_dim=1).double(), mi, atol=1e-6
    )
    assert (mi > 0).all() and (mi <= entropy).all()
    assert predictive_entropy(torch.full((3,), 1 / 3)).item() == pytest.approx(
        torch.log(torch.tensor(3.0)).item()
    )


class MyDropout(nn.Module):  # third-party dropout, recognised by its class name
    def __init__(self):
        super().__init__()
        self.p = 0.2

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class DropPath(nn.Module):  # stochastic depth: not dropout, stays in eval
    def forward(self, x):
        return x


def test_dropout_active_switches_only_dropout_and_restores_every_mode_also_on_error():
    dropouts = [nn.Dropout(0.1), nn.Dropout1d(0.1), nn.Dropout2d(0.1), nn.Dropout3d(0.1),
                nn.AlphaDropout(0.1), nn.FeatureAlphaDropout(0.1), MyDropout()]  # fmt: skip
    others = [nn.Linear(2, 2), nn.BatchNorm1d(2), DropPath(), nn.Dropout(0.0)]
    net = nn.Sequential(*dropouts, *others)
    net.train()
    net[7].eval()  # a mixed starting state must come back as it was
    before = [m.training for m in net.modules()]
    with dropout_active(net) as switched:
        assert switched == dropouts
        assert all(m.training for m in dropouts)
        assert not any(m.training for m in [net, *others])
    assert [m.training for m in net.modules()] == before
    with pytest.raises(KeyError), dropout_active(net):
        raise KeyError("boom")
    assert [m.training for m in net.modules()] == before
    no_dropout = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))
    with (
        pytest.raises(ValueError, match="no dropout module with p > 0"),
        dropout_active(no_dropout),
    ):
        pass


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.4), nn.Linear(32, 3)
    )  # fmt: skip


@pytest.mark.parametrize("max_batch_size", [None, 1, 20])
def test_functional_equals_a_direct_implementation_with_the_same_seed(max_batch_size):
    net, x = _net(), torch.randn(5, 6)
    net[1].running_mean.normal_()
    n, seed = 8, 11
    out = mc_dropout_predict(net, x, num_samples=n, max_batch_size=max_batch_size, seed=seed)
    if max_batch_size is None:
        logits = manual_passes(net, x, n, seed)
    elif max_batch_size == 1:
        logits = manual_passes(net, x, n, seed, batched=False)
    else:  # 20 rows: forwards of 4, 4 passes (the batch is 5 rows)
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        net[3].train()
        with torch.no_grad(), seeded_rng(seed):
            logits = torch.cat([net(x.repeat(4, 1)), net(x.repeat(4, 1))]).reshape(n, 5, 3)
        for m, mode in modes:
            m.training = mode
    mean, entropy, mi = direct_result(logits)
    assert torch.allclose(out.probs.double(), mean, atol=1e-6)
    assert torch.allclose(out.entropy.double(), entropy, atol=1e-6)
    assert torch.allclose(out.mutual_information.double(), mi, atol=1e-6)
    assert net.training  # the module's own mode is back


def test_batched_and_sequential_passes_have_the_same_distribution():
    net, x = _net(1), torch.randn(3, 6)
    with torch.no_grad():
        net[4].weight.mul_(8)  # a wide spread between passes: mutual information ~0.2-0.5
    n = 1000
    batched = mc_dropout_predict(net, x, num_samples=n, seed=1)
    sequential = mc_dropout_predict(net, x, num_samples=n, max_batch_size=1, seed=2)
    assert not torch.equal(batched.probs, sequential.probs)  # different draws...
    # ...of the same distribution: the means of 1000 passes agree to Monte-Carlo error (one
    # mask shared by the copies of a forward would leave the batched passes with no spread)
    assert torch.allclose(batched.probs, sequential.probs, atol=0.04)
    mi_batched, mi_sequential = batched.mutual_information, sequential.mutual_information
    assert (mi_batched > 0.1).all()
    assert torch.allclose(mi_batched, mi_sequential, rtol=0.15)


def _loader(n=96, seed=0, batch_size=32):
    x = BlobsDataModule(n_train=n, n_val=0, seed=seed).train_set.tensors[0]
    return DataLoader(x, batch_size=batch_size)


def _trained(tmp_path, dropout=0.3, batchnorm=True):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(dropout=dropout, batchnorm=batchnorm)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, datamodule=BlobsDataModule())
    return model


def test_trainer_predict_matches_manual_passes_keeps_batchnorm_and_the_rng(tmp_path):
    model, loader = _trained(tmp_path), _loader()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mc = MCDropoutPrediction(num_samples=6, max_batch_size=100, seed=5)  # forwards of 3 passes

    def predict(callbacks):
        torch.manual_seed(123)
        out = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks)).predict(model, loader)
        return out, torch.rand(3)

    plain, rng_plain = predict([])
    out, rng_after = predict([mc])
    assert torch.equal(rng_after, rng_plain)  # the user's random stream is undisturbed
    assert all(torch.equal(a, b) for a, b in zip(out, plain, strict=True))  # output unchanged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN stats too
    expected = []
    for batch_idx, x in enumerate(loader):
        logits = manual_passes(model, x, 6, derive_seed(5, 0, 0, batch_idx))
        expected.append(direct_result(logits))
    for got, want in zip(mc.predictions, zip(*expected, strict=True), strict=True):
        assert torch.allclose(got.double(), torch.cat(want), atol=1e-6)
    first = mc.predictions
    predict([mc])  # a second predict starts afresh and reproduces the first
    assert all(torch.equal(a, b) for a, b in zip(first, mc.predictions, strict=True))
    restored = pickle.loads(pickle.dumps(mc))
    assert torch.equal(restored.predictions.probs, first.probs)


class DictPredictor(TinyClassifier):
    def predict_step(self, batch, batch_idx):
        return {"logits": self(batch), "rows": torch.arange(len(batch))}


def test_dict_outputs_gain_the_results_and_seed_everything_decides(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = DictPredictor(dropout=0.3)
    mc = MCDropoutPrediction(num_samples=5)

    def predict(seed):
        pl.seed_everything(seed, verbose=False)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mc]))
        return trainer.predict(model, _loader())

    out = predict(1)
    assert set(out[0]) == {"logits", "rows", "mc_probs", "mc_entropy", "mc_mutual_information"}
    assert torch.equal(torch.cat([o["mc_probs"] for o in out]), mc.predictions.probs)
    assert torch.allclose(mc.predictions.probs.sum(-1), torch.ones(96))
    again = predict(1)
    assert all(torch.equal(a["mc_probs"], b["mc_probs"]) for a, b in zip(out, again, strict=True))
    other = predict(2)
    assert not torch.equal(out[0]["mc_probs"], other[0]["mc_probs"])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mc], limit_predict_batches=0))
    trainer.predict(model, _loader())
    assert mc.predictions is None  # a run without batches holds nothing of the previous one


class VisionClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mobilenet_v3_small(num_classes=4)  # classifier has nn.Dropout(0.2)

    def forward(self, x):
        return self.net(x)


def test_torchvision_mobilenet_through_trainer_predict(tmp_path):
    torch.manual_seed(0)
    model = VisionClassifier()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    loader = DataLoader(torch.randn(4, 3, 32, 32), batch_size=4)
    results = {}
    for label, max_batch_size in (("batched", None), ("sequential", 1)):
        mc = MCDropoutPrediction(num_samples=4, max_batch_size=max_batch_size, seed=0)
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mc])).predict(model, loader)
        results[label] = mc.predictions
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    for result in results.values():
        assert torch.allclose(result.probs.sum(-1), torch.ones(4), atol=1e-5)
        assert (result.mutual_information > 0).all()
    # MobileNetV3 in eval mixes no rows: the first pass of each way is the same dropout draw
    x = next(iter(loader))
    with torch.no_grad(), dropout_active(model), seeded_rng(derive_seed(0, 0, 0, 0)):
        direct = model(x.repeat(4, 1, 1, 1)).reshape(4, 4, 4)
    assert torch.allclose(results["batched"].probs, direct_result(direct)[0].float(), atol=1e-5)


class SaveRankResults(pl.Callback):
    def __init__(self, root):
        self.root = root

    def on_predict_end(self, trainer, pl_module):
        mc = next(cb for cb in trainer.callbacks if isinstance(cb, MCDropoutPrediction))
        torch.save(mc.predictions.probs, f"{self.root}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_ranks_draw_different_masks_rank_zero_reproduces_single_device(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(dropout=0.3)
    loader = _loader(n=32, batch_size=16)
    single = MCDropoutPrediction(num_samples=8)
    pl.seed_everything(7, verbose=False)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[single])).predict(model, loader)
    pl.seed_everything(7, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, devices=2, strategy="ddp_spawn", use_distributed_sampler=False,
        callbacks=[MCDropoutPrediction(num_samples=8), SaveRankResults(str(tmp_path))],
    ))  # fmt: skip
    trainer.predict(model, loader, return_predictions=False)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.allclose(rank0, single.predictions.probs, atol=1e-6)  # same inputs, same seed
    assert not torch.allclose(rank0, rank1, atol=1e-3)  # same inputs, other masks


def test_bad_arguments_are_refused():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            MCDropoutPrediction(num_samples=bad)
    with pytest.raises(ValueError, match="max_batch_size"):
        MCDropoutPrediction(max_batch_size=0)
    with pytest.raises(ValueError, match="num_samples"):
        mc_dropout_predict(_net(), torch.randn(2, 6), num_samples=0)
    with pytest.raises(ValueError, match="classes>=2"):
        mc_dropout_predict(nn.Sequential(nn.Linear(6, 1), nn.Dropout(0.5)), torch.randn(2, 6))


class ListPredictor(TinyClassifier):
    def predict_step(self, batch, batch_idx):
        return [self(batch)]


class CountingPredictor(TinyClassifier):
    calls = 0

    def predict_step(self, batch):
        CountingPredictor.calls += 1
        return self(batch)


def test_models_and_outputs_that_cannot_work_are_refused_clearly(tmp_path):
    def predict(model, **kwargs):
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[MCDropoutPrediction(**kwargs)]))
        return trainer.predict(model, _loader(n=8))

    with pytest.raises(RuntimeError, match="no dropout module with p > 0"):
        predict(CountingPredictor(dropout=0.0))
    assert CountingPredictor.calls == 0  # refused at predict start, before any batch
    with pytest.raises(RuntimeError, match="got list"):
        predict(ListPredictor(dropout=0.2))
    with pytest.raises(RuntimeError, match=r"under 'scores'.*keys \['logits', 'rows'\]"):
        predict(DictPredictor(dropout=0.2), logits_key="scores")


class ProbsPredictor(TinyClassifier):
    def predict_step(self, batch, batch_idx):
        return self(batch).softmax(-1)


class LogProbsPredictor(TinyClassifier):
    def predict_step(self, batch, batch_idx):
        return {"logits": self(batch).log_softmax(-1)}


def test_probabilities_and_log_probabilities_are_declared_not_softmaxed_again(tmp_path):
    torch.manual_seed(0)
    logits_model = TinyClassifier(dropout=0.3)
    probs_model, log_probs_model = ProbsPredictor(dropout=0.3), LogProbsPredictor(dropout=0.3)
    probs_model.load_state_dict(logits_model.state_dict())
    log_probs_model.load_state_dict(logits_model.state_dict())

    def predict(model, **kwargs):
        mc = MCDropoutPrediction(num_samples=4, seed=3, **kwargs)
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mc])).predict(model, _loader(n=40))
        return mc.predictions

    want = predict(logits_model)
    for model, outputs in ((probs_model, "probs"), (log_probs_model, "log_probs")):
        got = predict(model, outputs=outputs)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    # probabilities taken for logits: refused on the first batch, naming the fix
    with pytest.raises(ValueError, match=r"outputs='probs'.*without the softmax"):
        predict(probs_model)
    with pytest.raises(ValueError, match="rows are not in"):
        predict(logits_model, outputs="probs")
    with pytest.raises(ValueError, match="do not sum to 1"):
        predict(logits_model, outputs="log_probs")
    # the functional form: the same rule, the same numbers
    net, x = _net(0), torch.randn(5, 6)
    softmaxed = nn.Sequential(net, nn.Softmax(-1))
    with pytest.raises(ValueError, match="outputs='probs'"):
        mc_dropout_predict(softmaxed, x, num_samples=3, seed=1)
    a = mc_dropout_predict(softmaxed, x, num_samples=3, seed=1, outputs="probs")
    b = mc_dropout_predict(net, x, num_samples=3, seed=1)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="`outputs` must be one of"):
        MCDropoutPrediction(outputs="softmax")


class HeldBatches(pl.Callback):
    def __init__(self, mc):
        self.mc, self.held = mc, []

    def on_predict_batch_end(self, *args, **kwargs):
        self.held.append(sum(len(b) for b in self.mc._batches))


def test_keep_predictions_false_keeps_nothing_and_still_fills_dict_outputs(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = DictPredictor(dropout=0.3)
    kept, lean = MCDropoutPrediction(num_samples=3), MCDropoutPrediction(3, keep_predictions=False)
    outs, held = [], []
    for mc in (kept, lean):
        probe = HeldBatches(mc)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mc, probe]))
        outs.append(trainer.predict(model, _loader()))
        held.append(probe.held)
    assert held == [[1, 2, 3], [0, 0, 0]]  # results kept per batch by the callback
    assert kept.predictions is not None and lean.predictions is None
    assert set(outs[1][0]) == {"logits", "rows", "mc_probs", "mc_entropy", "mc_mutual_information"}
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a["mc_probs"], b["mc_probs"])
        assert torch.equal(a["mc_mutual_information"], b["mc_mutual_information"])
