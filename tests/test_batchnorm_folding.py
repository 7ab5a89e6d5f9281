"""Batch norms folded into their convolutions (wcam/engine/batchnorm_folding.py) explain the same layers.

The explained layer is the convolution's own output; the folded network computes ``s A + t`` instead and the
engine recovers A's map and score algebraically. These tests check that against the independent float64
reference on the unfolded model (tests/reference.py), on real architectures and on the cases where folding
must not happen or must be redone.

Tolerances:
* float64 engine vs float64 reference: 1e-9 max abs (as everywhere: same precision, other summation order;
  folding adds a few roundings of the weights, ~1e-16 relative);
* float32 folded engine vs the float64 engine on the pretrained EfficientNet-Lite0 and real photos: 1e-3 on
  [0, 1] heatmaps (measured 1.7e-4, against 1e-5 unfolded: the folded output holds A to float32 rounding
  at the scale of the batch norm's shift, the price of folding) and 1e-7 on layer scores (measured 1e-8).
"""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch
from torch import nn

from helpers import agrees_with_reference, hook_counts, max_diff
from wcam import Engine
from wcam.engine.batchnorm_folding import fold_batch_norms
from wcam.engine.capture import LayerCapture

SHAPE = (48, 64)


def images(batch: int, seed: int, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    return torch.randn(batch, 3, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomise_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so that folding matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
                module.running_var.copy_(torch.rand(n, generator=generator, dtype=torch.float64) + 0.5)
                module.weight.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
                module.bias.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
    return model


@pytest.fixture(scope="module")
def resnet64(seeded_models) -> nn.Module:
    return randomise_batch_norms(copy.deepcopy(seeded_models("resnet18")).double(), seed=1)


def explained_copy(resnet64: nn.Module, batch: int, seed: int) -> tuple[nn.Module, Engine, torch.Tensor]:
    """A copy of the model, a folding engine on it that has explained ``images(batch, seed)`` once, and those."""
    model = copy.deepcopy(resnet64)
    engine = Engine(model, fold_batch_norms=True)
    x = images(batch, seed=seed)
    engine.explain(x)
    return model, engine, x


def folded_count(engine: Engine) -> int:
    network = engine._runner.folding._network
    return 0 if network is None else network.folded


def test_resnet18_folded_matches_the_reference(resnet64):
    result, _ = agrees_with_reference(resnet64, images(3, seed=2), fold_batch_norms=True)
    engine = Engine(resnet64, fold_batch_norms=True)
    engine.explain(images(1, seed=2))
    assert folded_count(engine) == 20  # every conv of resnet18 feeds a batch norm (downsample ones too)
    assert engine._runner._copied == frozenset()  # the in-place ReLUs and += were made out of place


def test_lite0_folded_matches_the_reference(lite0):
    model = copy.deepcopy(lite0.model).double()
    x = images(2, seed=3, shape=(96, 96))
    agrees_with_reference(model, x, ps=(50.0, 90.0), fold_batch_norms=True)
    engine = Engine(model, fold_batch_norms=True)
    engine.explain(x[:1])
    assert folded_count(engine) == 49  # Conv2dStaticSamePadding, a Conv2d subclass, folds too


def test_densenet_folds_where_a_conv_feeds_a_batch_norm(seeded_models):
    model = randomise_batch_norms(copy.deepcopy(seeded_models("densenet121")).double(), seed=4)
    x = images(1, seed=5, shape=(64, 64))
    agrees_with_reference(model, x, ps=(90.0,), fold_batch_norms=True)
    engine = Engine(model, fold_batch_norms=True)
    engine.explain(x)
    assert folded_count(engine) == 59  # conv0 -> norm0, and conv1 -> norm2 in each of the 58 dense layers


def test_float32_folded_on_real_photos_against_float64(lite0, photos):
    """The precision folding costs: F = s A + t holds A to float32 rounding at the scale of t."""
    engine = Engine(lite0.model, preprocess=lite0.preprocess, fold_batch_norms=True)
    batch, _ = engine.preprocess([photos["chelsea"], photos["coffee"]], engine.device)
    folded = engine.explain(batch, p=90.0)
    exact = Engine(copy.deepcopy(lite0.model).double()).explain(batch.double(), p=90.0)  # = reference, 1e-9
    assert folded_count(engine) == 49
    assert folded.targets.tolist() == exact.targets.tolist()
    assert max_diff(folded.layer_scores, exact.layer_scores) <= 1e-7  # measured 1.0e-8 (scores up to 5.6e-4)
    assert max_diff(folded.heatmaps, exact.heatmaps) <= 1e-3  # measured 1.7e-4 (unfolded: within 1e-5)


class ConvBnHead(nn.Module):
    """One conv feeding one batch norm, then a linear head: the smallest model with something to fold; the
    subclasses below differ only in their forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)


class FrozenBackbone(ConvBnHead):
    """A linear probe: conv + batch norm under ``torch.no_grad()``, which fx does not record."""

    def forward(self, x):
        with torch.no_grad():
            x = self.bn(self.conv(x)).relu()
        return self.fc(x.mean(dim=(2, 3)))


def test_a_trace_that_loses_a_no_grad_block_is_not_used(caplog):
    torch.manual_seed(18)
    model = randomise_batch_norms(FrozenBackbone().double(), seed=18).eval()
    with caplog.at_level(logging.INFO, logger="wcam.engine.batchnorm_folding"):
        with pytest.raises(RuntimeError, match="depend on none of the explained layers"):
            Engine(model, fold_batch_norms=True).explain(images(2, seed=19))  # as unfolded: no gradient
    assert "switches grad mode (torch.no_grad() or enable_grad()) inside its forward" in caplog.text


class PartlyFrozen(ConvBnHead):
    """A trainable branch beside a frozen one (under ``torch.no_grad()``, which fx does not record): the trace
    sends gradients down the frozen branch too, so they exist in both but differ by O(1)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.frozen_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        with torch.no_grad():
            fixed = self.frozen_bn(self.frozen(x)).relu()
        return self.fc((self.bn(self.conv(x)).relu() + fixed).mean(dim=(2, 3)))


def test_a_model_that_switches_grad_mode_runs_unfolded(caplog):
    """fx would trace PartlyFrozen's frozen branch as trainable: its input gradients then differ by 3.4x their
    norm, but where another path dominates the input gradient the difference can be small while the explained
    layers' gradients differ by O(1); so any grad-mode switch in the forward rules the trace out."""
    torch.manual_seed(25)
    model = randomise_batch_norms(PartlyFrozen().double(), seed=25).eval()
    with caplog.at_level(logging.INFO, logger="wcam.engine.batchnorm_folding"):
        agrees_with_reference(model, images(2, seed=26), ps=(90.0,), layers=["conv"], fold_batch_norms=True)
    assert "switches grad mode" in caplog.text


def test_the_input_gradient_check_allows_float32_noise_and_refuses_structural_faults():
    from wcam.engine.batchnorm_folding import _difference

    logits = torch.ones(1, 3)
    gradient = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(27))
    assert _difference((logits, gradient), (logits, gradient * (1 + 8.4e-3))) == ""  # measured float32 folding
    assert "input gradients differ" in _difference((logits, gradient), (logits, gradient * 1.06))
    assert "input gradients differ" in _difference((logits, gradient), (logits, -gradient))


def test_folding_is_for_the_eager_backend_only(resnet64):
    with pytest.raises(ValueError, match="eager backend"):
        Engine(resnet64, backend="compiled", fold_batch_norms=True)


class Branching(nn.Module):
    """conv1's output feeds its batch norm and a skip connection (not foldable); conv2 -> bn2 is; bn3 zeroes
    some channels (gamma = 0); a hooked conv3 keeps the hook's view of its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        a = self.conv1(x)
        x = torch.relu(self.bn1(a)) + a
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x)).relu_()
        return self.fc(x.mean(dim=(2, 3)))


def branching(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = randomise_batch_norms(Branching().double(), seed)
    with torch.no_grad():
        model.bn3.weight[:2] = 0.0
    return model.eval()


def test_only_convs_whose_output_feeds_nothing_but_the_batch_norm_fold():
    model = branching(7)
    network = fold_batch_norms(model)
    assert sorted(network.affines) == ["conv2", "conv3"]
    agrees_with_reference(model, images(2, seed=8), fold_batch_norms=True)


def test_a_conv_with_a_hook_of_its_own_is_not_folded_and_the_hook_sees_its_output():
    model = branching(9)
    seen = []
    handle = model.conv3.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:
        x = images(2, seed=10)
        engine = Engine(model, fold_batch_norms=True)
        engine.explain(x)
        assert sorted(engine._runner.folding._network.affines) == ["conv2"]
        with torch.no_grad():
            model(x)
        assert max_diff(seen[-2], seen[-1]) <= 1e-12  # the explain's view was the raw conv3 output (the
        # folded conv2 before it rounds differently)
    finally:
        handle.remove()


def test_a_changed_model_is_folded_again(resnet64):
    model, engine, x = explained_copy(resnet64, 2, seed=11)
    first = engine._runner.folding._network
    with torch.no_grad():  # in place, as an optimiser step or load_state_dict would
        model.layer2[0].bn1.running_var.mul_(3.0)
        model.layer3[1].conv2.weight.mul_(-0.5)
    agrees_with_reference(model, x, ps=(90.0,), fold_batch_norms=True)
    got, fresh = engine.explain(x), Engine(copy.deepcopy(model), fold_batch_norms=False).explain(x)
    assert engine._runner.folding._network is not first
    assert max_diff(got.heatmaps, fresh.heatmaps) <= 1e-9
    second = engine._runner.folding._network
    model.fc = nn.Linear(512, 7).double()  # a module replaced
    got = engine.explain(x)
    assert engine._runner.folding._network is not second and got.logits.shape == (2, 7)
    assert max_diff(got.heatmaps, Engine(copy.deepcopy(model), fold_batch_norms=False).explain(x).heatmaps) <= 1e-9


def test_a_hook_put_later_on_a_traced_through_block_fires(resnet64):
    model, engine, x = explained_copy(resnet64, 1, seed=12)
    calls = []
    handles = [model.layer1[0].register_forward_hook(lambda m, i, out: calls.append("block")),
               model.layer2[0].bn1.register_forward_hook(lambda m, i, out: calls.append("bn"))]
    try:
        engine.explain(x)  # folds again (the check runs the model and the new trace once each)
        network = engine._runner.folding.current
        calls.clear()
        engine.explain(x)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(calls) == ["block", "bn"]  # each ran once: no folding again, hooks seen
    # 20 - layer1.0's two pairs (now inside a unit) - layer2.0's conv1/bn1 (the bn has a hook); the explained
    # convs inside layer1.0 are not units of this trace, so the calls ran the model itself
    assert engine._runner.folding.current is network and network.folded == 17


class StandardisedConv(nn.Conv2d):
    """A convolution that standardises its weight per output channel: scaling the weight changes nothing,
    so folding a batch norm into it would be wrong (the logit check must catch it)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_conv_that_folding_would_break_runs_unfolded(caplog):
    torch.manual_seed(13)
    model = nn.Sequential(
        StandardisedConv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).double()
    randomise_batch_norms(model, seed=13).eval()
    with caplog.at_level(logging.WARNING, logger="wcam.engine.batchnorm_folding"):
        agrees_with_reference(model, images(2, seed=14), ps=(90.0,), fold_batch_norms=True)
    assert "logits differ" in caplog.text


class DataDependent(ConvBnHead):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.mean() > 100:
            x = x * 2
        return self.fc(x.relu().mean(dim=(2, 3)))


def test_an_untraceable_model_runs_unfolded(caplog):
    torch.manual_seed(15)
    model = randomise_batch_norms(DataDependent().double(), seed=15).eval()
    with caplog.at_level(logging.INFO, logger="wcam.engine.batchnorm_folding"):
        agrees_with_reference(model, images(2, seed=16), ps=(90.0,), fold_batch_norms=True)
    assert "cannot be traced" in caplog.text


def test_folding_leaves_the_model_as_it_was(resnet64):
    model = copy.deepcopy(resnet64)
    model.train()
    modules = [(name, id(m), m.training) for name, m in model.named_modules()]
    state = {name: t.clone() for name, t in model.state_dict().items()}
    params = [(name, id(p), p.data_ptr(), p.requires_grad) for name, p in model.named_parameters()]
    hooks = hook_counts(model)
    engine = Engine(model, fold_batch_norms=True)
    engine.explain(images(2, seed=17))
    assert folded_count(engine) == 20
    assert [(name, id(m), m.training) for name, m in model.named_modules()] == modules
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
    assert [(name, id(p), p.data_ptr(), p.requires_grad) for name, p in model.named_parameters()] == params
    assert hook_counts(model) == hooks
    assert all(p.grad is None for p in model.parameters())


class PausedTrace(ConvBnHead):
    """Stops inside its own trace (its forward sees an fx Proxy) until ``resume`` is set, holding torch.fx's
    process-wide patch of ``nn.Module`` in place meanwhile."""

    def __init__(self, tracing: threading.Event, resume: threading.Event) -> None:
        super().__init__()
        self.tracing, self.resume = tracing, resume

    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            self.tracing.set()
            assert self.resume.wait(timeout=60)
        return self.fc(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))


def test_other_threads_run_their_models_while_a_fold_traces(resnet64):
    torch.manual_seed(20)
    tracing, resume = threading.Event(), threading.Event()
    paused = randomise_batch_norms(PausedTrace(tracing, resume).double(), seed=20).eval()
    folder = threading.Thread(target=lambda: Engine(paused, fold_batch_norms=True).explain(images(1, seed=21)))
    other = copy.deepcopy(resnet64)
    x = images(2, seed=22)
    expected = Engine(other).explain(x)
    folder.start()
    try:
        assert tracing.wait(timeout=60)
        got = Engine(other).explain(x)  # under fx's patch of nn.Module.__call__ and __getattr__
        with torch.no_grad():
            logits = other(x)
    finally:
        resume.set()
        folder.join()
    assert max_diff(got.heatmaps, expected.heatmaps) <= 1e-12
    assert type(logits) is torch.Tensor and max_diff(logits, expected.logits) <= 1e-12


def test_another_calls_capture_hooks_do_not_make_the_model_look_changed(resnet64):
    model, engine, _ = explained_copy(resnet64, 1, seed=23)
    network = engine._runner.folding.current
    # what a concurrent explain(layers=["layer4"]) in another thread holds on the model: a hook on a
    # traced-through block
    made = []
    maker = threading.Thread(target=lambda: made.append(LayerCapture(model, ["layer4", "layer2.0.conv1"])))
    maker.start()
    maker.join()
    with made[0]:
        assert network.matches(model)
        assert fold_batch_norms(model, engine.layers).folded == network.folded
    handle = model.layer4.register_forward_hook(lambda m, i, out: None)  # a hook of the model's own does count
    try:
        assert not network.matches(model)
    finally:
        handle.remove()


def test_a_model_with_non_finite_logits_is_folded_once_mended(resnet64, caplog):
    model = copy.deepcopy(resnet64)
    with torch.no_grad():
        model.bn1.running_var.fill_(float("nan"))  # NaN logits: the folding's check fails, and so does the call
    engine = Engine(model, fold_batch_norms=True)
    x = images(1, seed=24)
    with caplog.at_level(logging.INFO, logger="wcam.engine.batchnorm_folding"):
        for _ in range(2):  # NaN logits fail the call anyway: nothing is remembered, the next call tries again
            with pytest.raises(FloatingPointError, match="NaN or Inf logits"):
                engine.explain(x)
    assert caplog.text.count("not folded for this call: the model's own logits are not finite") == 2
    with torch.no_grad():
        model.bn1.running_var.fill_(1.0)  # mended in place: folded now
    got = engine.explain(x)
    assert folded_count(engine) == 20
    assert max_diff(got.heatmaps, Engine(copy.deepcopy(model)).explain(x).heatmaps) <= 1e-9


class OptionalActivation(ConvBnHead):
    """conv -> (act) -> bn: nothing to fold while ``act`` stands between them."""

    def __init__(self) -> None:
        super().__init__()
        self.act: nn.Module | None = nn.ReLU()

    def forward(self, x):
        x = self.conv(x)
        if self.act is not None:
            x = self.act(x)
        return self.fc(self.bn(x).relu().mean(dim=(2, 3)))


def test_a_model_with_nothing_to_fold_is_traced_again_once_it_changes(caplog):
    torch.manual_seed(28)
    model = randomise_batch_norms(OptionalActivation().double(), seed=28).eval()
    engine = Engine(model, fold_batch_norms=True)
    x = images(1, seed=29)
    with caplog.at_level(logging.INFO, logger="wcam.engine.batchnorm_folding"):
        engine.explain(x)
        engine.explain(x)  # the rejected trace still matches the model: not traced again
    assert caplog.text.count("no convolution that feeds a batch norm alone") == 1 and folded_count(engine) == 0
    assert engine._runner.folding._rejected.module is None  # the folded copies are not kept
    model.act = None  # now the convolution feeds the batch norm
    got = engine.explain(x)
    assert folded_count(engine) == 1
    assert max_diff(got.heatmaps, Engine(copy.deepcopy(model)).explain(x).heatmaps) <= 1e-9


class MadeConstant(ConvBnHead):
    """Makes a tensor in its forward, which fx stores as an attribute of the module it traces."""

    def forward(self, x):
        x = self.bn(self.conv(x)) * torch.tensor([2.0], dtype=x.dtype)
        return self.fc(x.relu().mean(dim=(2, 3)))


def test_folding_leaves_no_attribute_on_the_model():
    torch.manual_seed(30)
    model = randomise_batch_norms(MadeConstant().double(), seed=30).eval()
    attributes = set(model.__dict__)
    engine = Engine(model, fold_batch_norms=True)
    got = engine.explain(images(2, seed=31))
    assert folded_count(engine) == 1 and set(model.__dict__) == attributes
    assert max_diff(got.heatmaps, Engine(copy.deepcopy(model)).explain(images(2, seed=31)).heatmaps) <= 1e-9


def test_two_folds_never_trace_at_once(resnet64):
    """fx undoes its process-wide patches through one global patcher, so two traces that overlap undo each
    other's: the second fold waits until the first has traced, and nn.Module is torch's own afterwards."""
    call = nn.Module.__call__
    torch.manual_seed(32)
    tracing, resume = threading.Event(), threading.Event()
    paused = randomise_batch_norms(PausedTrace(tracing, resume).double(), seed=32).eval()
    first = threading.Thread(target=lambda: fold_batch_norms(paused, ["conv"]))
    done = threading.Event()
    folded = []

    def second() -> None:
        folded.append(fold_batch_norms(copy.deepcopy(resnet64), ["conv1"]).folded)
        done.set()

    other = threading.Thread(target=second)
    first.start()
    try:
        assert tracing.wait(timeout=60)
        other.start()
        assert not done.wait(timeout=1.0)  # held back while the first trace is open
    finally:
        resume.set()
        first.join()
        other.join()
    assert folded == [20] and nn.Module.__call__ is call
