"""Tests of the pure weight-decay split: ``split_parameters``, ``param_groups`` and friends.

Property tests run over generated module trees and compare the split with an oracle written from
the documented rules; example tests pin exact names and counts on real architectures.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_reg import RegularizedModule
from lightning_reg.weight_decay import (
    RULES,
    WeightDecaySplit,
    coupled_weight_decay_warning,
    is_norm_module,
    param_groups,
    split_parameters,
)

PROPERTY = settings(
    max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
FLAGS = ("exclude_bias", "exclude_norm", "exclude_1d", "exclude_embeddings")


# ---------------------------------------------------------------------------------------------
# Building blocks for generated trees and the example architectures
# ---------------------------------------------------------------------------------------------


class MyScaleNorm(nn.Module):
    """A user-defined norm layer: a 1-d gain, recognised by its class name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class ChannelNorm(nn.Module):
    """A user-defined norm with a 2-d parameter: only the ``norm`` rule excludes it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x / x.std(dim=-1, keepdim=True).clamp_min(1e-6)


class Rescale(nn.Module):
    """A norm-like gain whose class name does not say ``Norm``: only the ``1d`` rule catches it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * x


class RawParams(nn.Module):
    """Raw parameters on a plain module: 1-d ``scale``, 0-d ``temperature``, 3-d ``kernel``."""

    def __init__(self, dim: int, scalar: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.kernel = nn.Parameter(torch.zeros(2, dim, 2))
        if scalar:
            self.temperature = nn.Parameter(torch.tensor(1.0))


class HookedRawParams(RawParams):
    """``RawParams`` declaring its ``kernel`` through a nested ``no_weight_decay()`` hook."""

    def no_weight_decay(self) -> set[str]:
        return {"kernel"}


class RelPosBias(nn.Module):
    """A 2-d parameter named ``bias``: the ``bias`` rule goes by name, not by shape."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2, n))


class TiedPair(nn.Module):
    """An embedding and an output projection sharing one weight, in either registration order."""

    def __init__(self, vocab: int, dim: int, head_first: bool) -> None:
        super().__init__()
        head, embed = nn.Linear(dim, vocab, bias=False), nn.Embedding(vocab, dim)
        for name, mod in [("head", head), ("embed", embed)][:: 1 if head_first else -1]:
            self.add_module(name, mod)
        head.weight = embed.weight


class Block(nn.Module):
    """A custom container holding its children as attributes."""

    def __init__(self, children: Sequence[nn.Module]) -> None:
        super().__init__()
        for i, child in enumerate(children):
            self.add_module(f"part{i}", child)


class Root(nn.Module):
    def __init__(self, body: nn.Module, pos_embed: bool) -> None:
        super().__init__()
        self.body = body
        if pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, 2, 3))


class HookedRoot(Root):
    def __init__(self, body: nn.Module, pos_embed: bool, declared: Sequence[str]) -> None:
        super().__init__(body, pos_embed)
        self.declared = list(declared)

    def no_weight_decay(self) -> set[str]:
        return set(self.declared)


# The norm layers the generator builds; the oracle's idea of "owned by a norm module".
NORM_LEAVES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.RMSNorm,
    MyScaleNorm, ChannelNorm,
)  # fmt: skip
PATTERNS = ("*.bias", "*kernel", "body.*", "*.0.*", "*weight", "*scale*", "pos_*", "nope.*")

# ---------------------------------------------------------------------------------------------
# Hypothesis strategies
# ---------------------------------------------------------------------------------------------

dims = st.integers(1, 4)


@st.composite
def leaves(draw: st.DrawFn) -> nn.Module:
    kind = draw(
        st.sampled_from(
            [
                "linear", "conv", "embedding", "bn1d", "bn2d", "layernorm", "groupnorm",
                "instancenorm", "rmsnorm", "scalenorm", "channelnorm", "rescale", "raw",
                "hooked_raw", "relpos", "tied",
            ]
        )
    )  # fmt: skip
    d, e = draw(dims), draw(dims)
    if kind == "linear":
        return nn.Linear(d, e, bias=draw(st.booleans()))
    if kind == "conv":
        return nn.Conv2d(d, e, kernel_size=1, bias=draw(st.booleans()))
    if kind == "embedding":
        return nn.Embedding(d + 1, e)
    if kind == "bn1d":
        return nn.BatchNorm1d(d, affine=draw(st.booleans()))
    if kind == "bn2d":
        return nn.BatchNorm2d(d)
    if kind == "layernorm":
        affine = draw(st.booleans())
        return nn.LayerNorm(d, elementwise_affine=affine, bias=affine and draw(st.booleans()))
    if kind == "groupnorm":
        return nn.GroupNorm(2, 2 * d)
    if kind == "instancenorm":
        return nn.InstanceNorm1d(d, affine=True)
    if kind == "rmsnorm":
        return nn.RMSNorm(d, elementwise_affine=draw(st.booleans()))
    if kind == "scalenorm":
        return MyScaleNorm(d)
    if kind == "channelnorm":
        return ChannelNorm(d)
    if kind == "rescale":
        return Rescale(d)
    if kind == "raw":
        return RawParams(d, scalar=draw(st.booleans()))
    if kind == "hooked_raw":
        return HookedRawParams(d, scalar=draw(st.booleans()))
    if kind == "relpos":
        return RelPosBias(d)
    return TiedPair(d + 1, e, head_first=draw(st.booleans()))


@st.composite
def trees(draw: st.DrawFn, depth: int) -> nn.Module:
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(leaves())
    children = draw(st.lists(trees(depth - 1), min_size=1, max_size=3))
    if len(children) > 1 and draw(st.integers(0, 4)) == 0:
        children.append(children[0])  # the same module registered twice
    kind = draw(st.sampled_from(["sequential", "dict", "block"]))
    if kind == "sequential":
        return nn.Sequential(*children)
    if kind == "dict":
        return nn.ModuleDict({f"k{i}": child for i, child in enumerate(children)})
    return Block(children)


@st.composite
def models(draw: st.DrawFn) -> nn.Module:
    body = draw(trees(3))
    pos_embed = draw(st.booleans())
    if draw(st.booleans()):
        model: nn.Module = Root(body, pos_embed)
    else:
        names = [n for n, _ in Root(body, pos_embed).named_parameters()]
        declared = draw(st.lists(st.sampled_from([*names, *PATTERNS]), max_size=3))
        model = HookedRoot(body, pos_embed, declared)
    for p in model.parameters():
        if draw(st.integers(0, 4)) == 0:
            p.requires_grad_(False)
    return model


@st.composite
def options(draw: st.DrawFn, model: nn.Module) -> dict[str, Any]:
    names = [n for n, _ in model.named_parameters()]
    opts: dict[str, Any] = {flag: draw(st.booleans()) for flag in FLAGS}
    opts["use_no_weight_decay_hook"] = draw(st.booleans())
    opts["exclude"] = draw(st.lists(st.sampled_from([*names, *PATTERNS]), max_size=2))
    return opts


@st.composite
def cases(draw: st.DrawFn) -> tuple[nn.Module, dict[str, Any]]:
    model = draw(models())
    return model, draw(options(model))


# ---------------------------------------------------------------------------------------------
# The oracle: the documented rules, written independently of the implementation
# ---------------------------------------------------------------------------------------------


def _glob(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _places(model: nn.Module, param: Tensor) -> list[tuple[str, nn.Module]]:
    """Every (full name, owner) a parameter is reachable by: tied parameters have several."""
    return [
        (f"{prefix}.{leaf}" if prefix else leaf, owner)
        for prefix, owner in model.named_modules(remove_duplicate=False)
        for leaf, p in owner._parameters.items()
        if p is param
    ]


def _bias_name(leaf: str) -> bool:
    return leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")


def expected_reason(model: nn.Module, name: str, param: Tensor, opts: dict[str, Any]) -> str | None:
    """The rule that excludes ``name`` (first in the documented order), or None if it decays.

    A rule excludes a tied parameter if it matches any of its names or owners.
    """
    places = _places(model, param)
    opts = {flag: True for flag in FLAGS} | {"exclude_embeddings": False} | opts
    hook = opts.get("use_no_weight_decay_hook", True)
    root_declared = model.no_weight_decay() if hook and isinstance(model, HookedRoot) else []
    checks = [
        ("no_weight_decay", any(
            _glob(n, root_declared)
            or (hook and isinstance(o, HookedRawParams) and n.rpartition(".")[2] == "kernel")
            for n, o in places
        )),
        ("pattern", any(_glob(n, opts.get("exclude", ())) for n, _ in places)),
        ("norm", opts["exclude_norm"] and any(isinstance(o, NORM_LEAVES) for _, o in places)),
        ("embedding", opts["exclude_embeddings"]
         and any(isinstance(o, nn.Embedding) for _, o in places)),
        ("bias", opts["exclude_bias"] and any(_bias_name(n.rpartition(".")[2]) for n, _ in places)),
        ("1d", opts["exclude_1d"] and param.dim() < 2),
    ]  # fmt: skip
    return next((rule for rule, hit in checks if hit), None)


def ids(params: Iterable[Tensor]) -> list[int]:
    return [id(p) for p in params]


def names(pairs: Iterable[tuple[str, Tensor]]) -> list[str]:
    return [n for n, _ in pairs]


# ---------------------------------------------------------------------------------------------
# Property tests over generated trees
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(cases())
def test_split_is_a_partition_of_trainable_parameters(case):
    model, opts = case
    split = split_parameters(model, **opts)
    decay, no_decay = ids(p for _, p in split.decay), ids(p for _, p in split.no_decay)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(set(decay + no_decay)) == len(decay) + len(no_decay)  # no duplicates, tied once
    assert set(decay) | set(no_decay) == trainable  # frozen ones in neither
    assert all(p.requires_grad for _, p in split.decay + split.no_decay)
    # names are the canonical ``named_parameters`` names
    canonical = dict(model.named_parameters())
    assert all(canonical[n] is p for n, p in split.decay + split.no_decay)


@PROPERTY
@given(cases())
def test_split_follows_the_rules_in_order(case):
    model, opts = case
    split = split_parameters(model, **opts)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expected = {n: expected_reason(model, n, p, opts) for n, p in trainable}
    assert names(split.decay) == [n for n, r in expected.items() if r is None]
    assert names(split.no_decay) == [n for n, r in expected.items() if r is not None]
    assert split.reasons == {n: r for n, r in expected.items() if r is not None}
    assert set(split.reasons) == set(names(split.no_decay))
    assert set(split.reasons.values()) <= set(RULES)


@PROPERTY
@given(models())
def test_default_options_never_decay_excluded_kinds(model):
    split = split_parameters(model)
    declared = model.no_weight_decay() if isinstance(model, HookedRoot) else []
    for name, param in split.decay:
        prefix, _, leaf = name.rpartition(".")
        owner = model.get_submodule(prefix)
        assert leaf != "bias", name
        assert not is_norm_module(owner) and not isinstance(owner, NORM_LEAVES), name
        assert param.dim() >= 2, name
        assert not _glob(name, declared), name
        assert not (isinstance(owner, HookedRawParams) and leaf == "kernel"), name
    # what default options exclude: the parameters of norm layers whatever their shape
    for name, _ in split.no_decay:
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, ChannelNorm) and not _glob(name, declared):
            assert split.reasons[name] == "norm"


@PROPERTY
@given(cases(), st.sampled_from([*FLAGS, "use_no_weight_decay_hook", "exclude"]))
def test_relaxing_a_rule_only_moves_parameters_into_decay(case, rule):
    model, opts = case
    strict = split_parameters(model, **opts)
    relaxed_opts = dict(opts)
    if rule == "exclude_embeddings":
        strict = split_parameters(model, **(opts | {rule: True}))
        relaxed_opts[rule] = False
    elif rule == "exclude":
        relaxed_opts[rule] = []
    else:
        relaxed_opts[rule] = False
    relaxed = split_parameters(model, **relaxed_opts)
    assert set(names(strict.decay)) <= set(names(relaxed.decay))
    # the parameters that moved were excluded by exactly the relaxed rule
    rule_name = {
        "exclude_bias": "bias", "exclude_norm": "norm", "exclude_1d": "1d",
        "exclude_embeddings": "embedding", "use_no_weight_decay_hook": "no_weight_decay",
        "exclude": "pattern",
    }[rule]  # fmt: skip
    moved = set(names(relaxed.decay)) - set(names(strict.decay))
    assert all(strict.reasons[n] == rule_name for n in moved)
    assert rule_name not in relaxed.reasons.values()


@PROPERTY
@given(cases())
def test_include_frozen_places_every_parameter(case):
    model, opts = case
    split = split_parameters(model, include_frozen=True, **opts)
    placed = ids(p for _, p in split.decay + split.no_decay)
    assert sorted(placed) == sorted(ids(model.parameters()))  # parameters() yields tied ones once
    expected = {n: expected_reason(model, n, p, opts) for n, p in model.named_parameters()}
    assert split.reasons == {n: r for n, r in expected.items() if r is not None}


@PROPERTY
@given(cases(), st.floats(0.0, 1.0))
def test_param_groups_concatenate_to_the_split(case, weight_decay):
    model, opts = case
    split = split_parameters(model, **opts)
    groups = param_groups(model, weight_decay, **opts)
    expected = [(split.decay, weight_decay), (split.no_decay, 0.0)]
    expected = [(ids(p for _, p in part), wd) for part, wd in expected if part]
    assert [(ids(g["params"]), g["weight_decay"]) for g in groups] == expected
    assert all(set(g) == {"params", "weight_decay"} for g in groups)
    flat = ids(itertools.chain.from_iterable(g["params"] for g in groups))
    assert len(flat) == len(set(flat))
    assert set(flat) == {id(p) for p in model.parameters() if p.requires_grad}
    if groups:
        optimizer = torch.optim.AdamW(groups, lr=1e-3)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [wd for _, wd in expected]
    else:
        with pytest.raises(ValueError, match="empty parameter list"):
            torch.optim.AdamW(groups, lr=1e-3)


class MixinNet(RegularizedModule, nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body


@settings(PROPERTY, max_examples=20)
@given(cases())
def test_mixin_weight_decay_groups_equal_param_groups(case):
    model, opts = case
    net = MixinNet(model)
    opts = {k: (["body." + p for p in v] if k == "exclude" else v) for k, v in opts.items()}
    got = net.weight_decay_groups(0.05, **opts)
    want = param_groups(net, 0.05, **opts)
    assert [(ids(g["params"]), g["weight_decay"]) for g in got] == [
        (ids(g["params"]), g["weight_decay"]) for g in want
    ]


# ---------------------------------------------------------------------------------------------
# Targeted rule examples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "bias_reason"),
    [
        ({}, "bias"),
        ({"exclude_bias": False}, "1d"),
        ({"exclude_1d": False}, "bias"),
        ({"exclude_bias": False, "exclude_1d": False}, None),
    ],
)
def test_linear_bias_decays_only_when_both_bias_and_1d_rules_are_off(opts, bias_reason):
    split = split_parameters(nn.Linear(3, 2), **opts)
    assert split.reasons.get("bias") == bias_reason
    assert ("bias" in names(split.decay)) == (bias_reason is None)
    assert names(split.decay)[:1] == ["weight"]


def test_norm_rule_covers_norm_params_whatever_their_shape():
    model = nn.Sequential(nn.Linear(3, 3), ChannelNorm(3), nn.LayerNorm(3), Rescale(3))
    assert split_parameters(model).reasons == {
        "0.bias": "bias", "1.weight": "norm", "2.weight": "norm", "2.bias": "norm", "3.gain": "1d",
    }  # fmt: skip
    relaxed = split_parameters(model, exclude_norm=False)
    assert relaxed.reasons == {"0.bias": "bias", "2.weight": "1d", "2.bias": "bias", "3.gain": "1d"}
    assert names(relaxed.decay) == ["0.weight", "1.weight"]  # ChannelNorm's 2-d weight decays


def test_bias_rule_goes_by_name_not_shape():
    model = nn.Sequential(RelPosBias(3), RawParams(2, scalar=True))
    split = split_parameters(model)
    assert split.reasons == {"0.bias": "bias", "1.scale": "1d", "1.temperature": "1d"}
    assert names(split.decay) == ["1.kernel"]
    assert names(split_parameters(model, exclude_bias=False).decay) == ["0.bias", "1.kernel"]


def test_nested_no_weight_decay_names_are_relative_to_their_module():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(HookedRawParams(2, scalar=False)))
    split = split_parameters(model)
    assert split.reasons["1.0.kernel"] == "no_weight_decay"
    assert names(split.decay) == ["0.weight"]
    assert "1.0.kernel" in names(split_parameters(model, use_no_weight_decay_hook=False).decay)


def test_tied_parameters_are_placed_once_under_their_first_name():
    model = TiedPair(5, 3, head_first=False)
    split = split_parameters(model)
    assert names(split.decay) == ["embed.weight"] and not split.no_decay
    assert split_parameters(model, exclude_embeddings=True).reasons == {"embed.weight": "embedding"}
    groups = param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["params"] == [model.embed.weight]


@pytest.mark.parametrize(
    "opts",
    [{"exclude_embeddings": True}, {"exclude": ["embed.*"]}],
    ids=["exclude_embeddings", "pattern"],
)
def test_rules_see_every_alias_of_a_tied_parameter(opts):
    model = TiedPair(5, 3, head_first=True)
    assert not split_parameters(model, **opts).decay


def test_no_weight_decay_hook_sees_every_alias_of_a_tied_parameter():
    class Tied(TiedPair):
        def no_weight_decay(self) -> set[str]:
            return {"embed.weight"}

    assert not split_parameters(Tied(5, 3, head_first=True)).decay


def test_frozen_parameters_are_skipped_unless_included():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    split = split_parameters(model)
    assert names(split.decay) == ["2.weight"]
    assert names(split.no_decay) == ["1.weight", "1.bias", "2.bias"]
    full = split_parameters(model, include_frozen=True)
    assert names(full.decay) == ["0.weight", "2.weight"]
    assert full.reasons["0.bias"] == "bias"


def test_empty_and_parameterless_modules():
    for model in (nn.Sequential(), nn.ReLU(), nn.BatchNorm1d(3, affine=False)):
        split = split_parameters(model)
        assert split == WeightDecaySplit()
        assert param_groups(model, 0.1) == []
        assert (
            split.summary() == "decayed 0 tensors (0 parameters); excluded 0 tensors (0 parameters)"
        )


@pytest.mark.parametrize(
    "module",
    [
        nn.BatchNorm1d(2),
        nn.BatchNorm2d(2),
        nn.BatchNorm3d(2),
        nn.SyncBatchNorm(2),
        nn.InstanceNorm1d(2),
        nn.InstanceNorm2d(2, affine=True),
        nn.LayerNorm(2),
        nn.GroupNorm(1, 2),
        nn.LocalResponseNorm(2),
        nn.RMSNorm(2),
        MyScaleNorm(2),
        ChannelNorm(2),
        type("PreLayerNormWrapper", (nn.Module,), {})(),
        type("Custom", (nn.LayerNorm,), {})(2),
    ],
    ids=lambda m: type(m).__name__,
)
def test_is_norm_module_true(module):
    assert is_norm_module(module)


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(2, 2),
        nn.Conv2d(1, 1, 1),
        nn.Embedding(2, 2),
        nn.Sequential(),
        nn.Identity(),
        nn.Dropout(),
        nn.MultiheadAttention(2, 1),
        Rescale(2),
        RawParams(2, scalar=False),
        type("NormalizedClassifier", (nn.Linear,), {})(2, 2),  # "Norm" is not a whole word here
    ],
    ids=lambda m: type(m).__name__,
)
def test_is_norm_module_false(module):
    assert not is_norm_module(module)


# ---------------------------------------------------------------------------------------------
# Real architectures
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (out + self.shortcut(x)).relu()


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # with a bias, unlike the blocks' convs
        self.bn = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 4, 1))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, 2))
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.bn(self.stem(x)).relu()))
        return self.fc(x.mean(dim=(2, 3)))


def test_resnet_decays_exactly_conv_and_linear_weights():
    model = TinyResNet()
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    split = split_parameters(model)
    weights = [
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert names(split.decay) == weights
    assert len(weights) == 9 and len(bns) == 8  # 8 convs + fc; stem bn + 2 per block + shortcut bn
    assert split.reasons == (
        {f"{b}.{leaf}": "norm" for b in bns for leaf in ("weight", "bias")}
        | {"stem.bias": "bias", "fc.bias": "bias"}
    )
    counts = split.counts()
    assert counts["decay"] == (9, sum(model.get_parameter(n).numel() for n in weights))
    assert counts["norm"] == (16, 2 * (4 + 4 * 4 + 8 + 8 + 8)) and counts["bias"] == (2, 14)
    assert counts["no_decay"] == (18, 2 * 44 + 14)


def test_resnet_groups_decay_only_the_weights_under_sgd():
    model = TinyResNet()
    with torch.no_grad():  # non-trivial BN affine values, so decay on them would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=0.1), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    split = split_parameters(model)
    for name in names(split.decay):
        torch.testing.assert_close(model.get_parameter(name), before[name] * (1 - 0.5 * 0.1))
    for name in names(split.no_decay):
        torch.testing.assert_close(model.get_parameter(name), before[name], rtol=0, atol=0)


class TinyViT(nn.Module):
    def __init__(self, vocab: int = 20, seq: int = 5, d: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, seq + 1, d))
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok_embed(tokens)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


class LitViT(RegularizedModule, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyViT()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.weight_decay_groups(0.05), lr=1e-3)


def _layer_names(i: int) -> dict[str, list[str]]:
    p = f"encoder.layers.{i}."
    return {
        "decay": [p + n for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                  "linear1.weight", "linear2.weight")],
        "1d": [],
        "bias": [p + n for n in ("self_attn.in_proj_bias", "self_attn.out_proj.bias",
                                 "linear1.bias", "linear2.bias")],
        "norm": [p + n for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")],
    }  # fmt: skip


def test_transformer_split_by_rule():
    model = TinyViT()
    assert model(torch.randint(0, 20, (2, 5))).shape == (2, 3)
    layers = [_layer_names(i) for i in range(2)]
    by_rule = {
        k: [n for layer in layers for n in layer[k]] for k in ("decay", "1d", "bias", "norm")
    }
    split = split_parameters(model)
    assert set(names(split.decay)) == {"tok_embed.weight", "head.weight", *by_rule["decay"]}
    assert split.reasons == (
        {"cls_token": "no_weight_decay", "pos_embed": "no_weight_decay"}
        | dict.fromkeys(by_rule["norm"] + ["norm.weight", "norm.bias"], "norm")
        | dict.fromkeys(by_rule["bias"] + ["head.bias"], "bias")
        | dict.fromkeys(by_rule["1d"], "1d")
    )
    assert split.counts()["decay"][0] == 10 and split.counts()["no_decay"][0] == 2 + 10 + 7 + 2

    emb = split_parameters(model, exclude_embeddings=True)
    assert emb.reasons["tok_embed.weight"] == "embedding"
    assert set(names(emb.decay)) == set(names(split.decay)) - {"tok_embed.weight"}

    # without the hook the 3-d class token decays; the 3-d pos_embed needs a pattern
    no_hook = split_parameters(model, use_no_weight_decay_hook=False, exclude=["pos_*"])
    assert no_hook.reasons["pos_embed"] == "pattern"
    assert "cls_token" in names(no_hook.decay)


def test_transformer_inside_a_lightning_module():
    lit = LitViT()
    split = split_parameters(lit)
    assert split.reasons["model.pos_embed"] == split.reasons["model.cls_token"] == "no_weight_decay"
    patterned = split_parameters(lit, use_no_weight_decay_hook=False, exclude=["*.pos_*"])
    assert patterned.reasons["model.pos_embed"] == "pattern"
    assert "model.cls_token" in names(patterned.decay)
    both = split_parameters(lit, exclude=["*.pos_*", "*cls_token"])
    assert both.reasons["model.pos_embed"] == "no_weight_decay"  # the hook comes first

    optimizer = lit.configure_optimizers()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert ids(optimizer.param_groups[0]["params"]) == ids(p for _, p in split.decay)
    assert ids(optimizer.param_groups[1]["params"]) == ids(p for _, p in split.no_decay)
    grouped = lit.weight_decay_groups(0.1, exclude_embeddings=True, exclude=["*.head.*"])
    assert any(p is lit.model.tok_embed.weight for p in grouped[1]["params"])
    assert all(p is not lit.model.head.weight for p in grouped[0]["params"])


class LlamaBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.mlp_norm = MyScaleNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.SiLU(), nn.Linear(2 * d, d))
        self.gate = Rescale(d)
        self.channel_norm = ChannelNorm(d)


class RMSNormModel(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, d)
        self.blocks = nn.ModuleList([LlamaBlock(d), LlamaBlock(d)])
        self.final_norm = nn.RMSNorm(d)
        self.unembed = nn.Linear(d, 7, bias=False)


def test_rmsnorm_and_custom_norm_model():
    model = RMSNormModel()
    split = split_parameters(model)
    per_block = {
        "attn_norm.weight": "norm", "mlp_norm.gain": "norm", "mlp.2.bias": "bias",
        "gate.gain": "1d", "channel_norm.weight": "norm",
    }  # fmt: skip
    assert split.reasons == {
        f"blocks.{i}.{n}": r for i in range(2) for n, r in per_block.items()
    } | {"final_norm.weight": "norm"}
    decayed = ["qkv.weight", "mlp.0.weight", "mlp.2.weight"]
    assert names(split.decay) == (
        ["embed.weight"]
        + [f"blocks.{i}.{n}" for i in range(2) for n in decayed]
        + ["unembed.weight"]
    )
    # with exclude_norm off the 1-d gains still fall to the 1-d rule, the 2-d ChannelNorm decays
    relaxed = split_parameters(model, exclude_norm=False)
    assert relaxed.reasons["blocks.0.attn_norm.weight"] == "1d"
    assert relaxed.reasons["blocks.1.mlp_norm.gain"] == "1d"
    assert "blocks.0.channel_norm.weight" in names(relaxed.decay)
    # with the 1-d rule off too, only norm-named classes still protect their gains
    no_1d = split_parameters(model, exclude_1d=False)
    assert "blocks.0.gate.gain" in names(no_1d.decay)
    assert no_1d.reasons["blocks.0.mlp_norm.gain"] == "norm"


# ---------------------------------------------------------------------------------------------
# Counts and summary
# ---------------------------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 12)  # 1,200 decayed
        self.fc = nn.Linear(12, 4)  # weight 48 decayed, bias 4 "bias"
        self.norm = nn.LayerNorm(4)  # 4 + 4 "norm"
        self.scale = nn.Parameter(torch.ones(4))  # 4 "1d"
        self.pos = nn.Parameter(torch.zeros(1, 2, 3))  # 6 "no_weight_decay"
        self.frozen = nn.Linear(2, 2)  # 6, frozen
        self.frozen.requires_grad_(False)

    def no_weight_decay(self) -> list[str]:
        return ["pos"]


def test_counts_match_a_hand_count():
    counts = split_parameters(Small()).counts()
    assert counts == {
        "decay": (2, 1248), "no_decay": (5, 22), "no_weight_decay": (1, 6), "pattern": (0, 0),
        "norm": (2, 8), "embedding": (0, 0), "bias": (1, 4), "1d": (1, 4),
    }  # fmt: skip
    counts = split_parameters(Small(), exclude_embeddings=True, include_frozen=True).counts()
    assert counts["decay"] == (2, 48 + 4) and counts["embedding"] == (1, 1200)
    assert counts["no_decay"] == (7, 22 + 1200 + 2) and counts["bias"] == (2, 6)


def test_summary_matches_a_hand_count():
    assert split_parameters(Small()).summary() == (
        "decayed 2 tensors (1,248 parameters); excluded 5 tensors (22 parameters): "
        "no_weight_decay 1 (6), norm 2 (8), bias 1 (4), 1d 1 (4)"
    )
    assert split_parameters(Small(), exclude=["embed.*"]).summary() == (
        "decayed 1 tensors (48 parameters); excluded 6 tensors (1,222 parameters): "
        "no_weight_decay 1 (6), pattern 1 (1,200), norm 2 (8), bias 1 (4), 1d 1 (4)"
    )
    assert split_parameters(nn.Linear(2, 3, bias=False)).summary() == (
        "decayed 1 tensors (6 parameters); excluded 0 tensors (0 parameters)"
    )


@PROPERTY
@given(cases())
def test_counts_add_up(case):
    model, opts = case
    split = split_parameters(model, **opts)
    counts = split.counts()
    assert set(counts) == {"decay", "no_decay", *RULES}
    by_rule = [counts[rule] for rule in RULES]
    assert counts["no_decay"] == (sum(n for n, _ in by_rule), sum(e for _, e in by_rule))
    assert counts["decay"] == (len(split.decay), sum(p.numel() for _, p in split.decay))
    assert split.summary().startswith(f"decayed {counts['decay'][0]} tensors")


# ---------------------------------------------------------------------------------------------
# Coupled L2 warning
# ---------------------------------------------------------------------------------------------


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    "cls",
    [
        torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax,
        torch.optim.Adagrad, torch.optim.RMSprop,
    ],
)  # fmt: skip
def test_coupled_l2_warns(cls):
    message = coupled_weight_decay_warning(cls(_params(), lr=1e-3, weight_decay=0.01))
    assert message is not None
    assert "AdamW" in message and cls.__name__ in message


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=1e-3, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.0),
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True),
        lambda p: torch.optim.NAdam(p, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True),
        lambda p: torch.optim.RAdam(p, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True),
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
    ],
    ids=["AdamW", "SGD", "Adam-wd0", "Adam-default", "Adam-decoupled", "NAdam-decoupled",
         "RAdam-decoupled", "RMSprop-wd0"],
)  # fmt: skip
def test_no_coupled_l2_warning(make):
    assert coupled_weight_decay_warning(make(_params())) is None


def test_coupled_l2_warning_looks_at_every_group():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    assert coupled_weight_decay_warning(torch.optim.Adam(param_groups(model, 0.1))) is not None
    assert coupled_weight_decay_warning(torch.optim.Adam(param_groups(model, 0.0))) is None


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_negative_weight_decay_raises():
    with pytest.raises(ValueError, match=r"`weight_decay` must be >= 0, got -0.1"):
        param_groups(nn.Linear(2, 2), -0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        MixinNet(nn.Linear(2, 2)).weight_decay_groups(-1.0)
    assert param_groups(nn.Linear(2, 2), 0.0)[0]["weight_decay"] == 0.0


def test_exclude_as_a_string_raises():
    with pytest.raises(TypeError, match=r"list of glob patterns.*'\*\.bias'"):
        split_parameters(nn.Linear(2, 2), exclude="*.bias")
    with pytest.raises(TypeError, match="list of glob patterns"):
        param_groups(nn.Linear(2, 2), 0.1, exclude="*.bias")
    with pytest.raises(TypeError, match="list of glob patterns"):
        MixinNet(nn.Linear(2, 2)).weight_decay_groups(0.1, exclude="*.bias")


class BadHook(nn.Module):
    def __init__(self, declared: Any) -> None:
        super().__init__()
        self.declared = declared
        self.pos = nn.Parameter(torch.zeros(1, 2, 2))

    def no_weight_decay(self) -> Any:
        return self.declared


@pytest.mark.parametrize("declared", [3, None, "pos", 1.5], ids=repr)
def test_no_weight_decay_returning_non_names_raises(declared):
    message = (
        rf"BadHook\.no_weight_decay\(\) must return a set or list of parameter names.*{declared!r}"
    )
    with pytest.raises(TypeError, match=message):
        split_parameters(BadHook(declared))
    with pytest.raises(TypeError, match=r"BadHook\.no_weight_decay\(\)"):
        param_groups(nn.Sequential(nn.Linear(2, 2), BadHook(declared)), 0.1)
    # the hook is not consulted when it is switched off
    unhooked = split_parameters(BadHook(declared), use_no_weight_decay_hook=False)
    assert names(unhooked.decay) == ["pos"]


@pytest.mark.parametrize(
    "declared", [["pos"], ("pos",), {"pos"}, {"pos": 1}, iter(["pos"]), frozenset({"p*"})]
)  # fmt: skip
def test_no_weight_decay_accepts_any_iterable_of_names(declared):
    assert split_parameters(BadHook(declared)).reasons == {"pos": "no_weight_decay"}
