"""Which hooked outputs the eager backward is asked for (wcam/engine/gradient_roots.py), and what that buys:
every hook still fires (engine against the float64 reference to 1e-9, as in test_engine_api.py), and each
gradient is freed once used instead of living until the backward ends.

Models: hand-built nets of a few convolutions at 12 x 16, so that the graphs are small enough to state their
roots by hand: a chain, two stems that merge, a dead branch, an output autograd has no gradient for (an
unused piece of a ``chunk``), a backbone run under ``no_grad``; frozen and trainable parameters.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import agrees_with_reference
from torch import Tensor, nn

from wcam import Engine
from wcam.engine.capture import LayerCapture
from wcam.engine.gradient_roots import gradient_roots
from wcam.engine.runner import _maps_during_backward


class Chain(nn.Module):
    """c1 -> ReLU -> c2 -> ReLU -> c3 -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.c3 = nn.Conv2d(5, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.c3(self.c2(self.c1(x).relu()).relu()).mean(dim=(2, 3)))


class TwoStems(nn.Module):
    """Two stems on the input (``left``, and ``right`` -> ``right2``), concatenated into ``head``; ``dead``
    runs on the input but never reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.left = nn.Conv2d(3, 3, 3, padding=1)
        self.right = nn.Conv2d(3, 2, 1)
        self.right2 = nn.Conv2d(2, 2, 3, padding=1)
        self.dead = nn.Conv2d(3, 2, 1)
        self.head = nn.Conv2d(5, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.dead(x)
        both = torch.cat([self.left(x).relu(), self.right2(self.right(x).relu())], dim=1)
        return self.fc(self.head(both).relu().mean(dim=(2, 3)))


def roots_of(model: nn.Module, names: list[str], x: Tensor) -> tuple[set[str], list[str]]:
    with LayerCapture(model, names) as capture, torch.enable_grad():
        logits = model(x)
        reached, roots = gradient_roots(logits[:, 0].sum(), capture.collect())
    return {names[i] for i in reached}, [names[i] for i in roots]


def x12(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(5), dtype=dtype)


def test_a_chain_has_one_root_frozen_or_trainable():
    model = Chain()
    names = ["c1", "c2", "c3"]
    assert roots_of(model, names, x12()) == ({"c1", "c2", "c3"}, ["c1"])  # c1's output is a non-leaf
    model.requires_grad_(False)  # c1's output is then made a leaf by the capture: still the root
    assert roots_of(model, names, x12()) == ({"c1", "c2", "c3"}, ["c1"])
    assert roots_of(model, ["c3", "c1"], x12()) == ({"c1", "c3"}, ["c1"])  # layer order does not matter


def test_two_stems_are_two_roots_and_a_dead_branch_is_not_reached():
    model = TwoStems().requires_grad_(False)
    reached, roots = roots_of(model, ["left", "right", "right2", "dead", "head"], x12())
    assert reached == {"left", "right", "right2", "head"}
    assert roots == ["left", "right"]


def test_two_stems_agree_with_the_reference():
    """Every hook fires when the backward is asked for the two roots only (float64, 1e-9 as elsewhere)."""
    model = TwoStems().double().requires_grad_(False)
    got, _ = agrees_with_reference(model, x12(torch.float64), layers=["left", "right", "right2", "dead", "head"])
    assert float(got.layer_scores[:, 3].abs().max()) == 0.0  # dead
    assert float(got.layer_scores[:, :3].abs().max()) > 0.0  # the stems had gradients


def _alive_at_the_earliest(backward) -> list[list[bool]]:
    """Run ``backward(objective, activations)`` on the chain; at c1's gradient, which later gradients live."""
    model = Chain().requires_grad_(False)
    names = ["c1", "c2", "c3"]
    refs: dict[str, weakref.ref] = {}
    alive: list[list[bool]] = []

    def watch(name: str):
        def hook(gradient: Tensor) -> None:
            refs[name] = weakref.ref(gradient)
            if name == "c1":
                alive.append([refs[n]() is not None for n in ("c2", "c3")])

        return hook

    with LayerCapture(model, names) as capture, torch.enable_grad():
        logits = model(x12())
        activations = capture.collect()
        handles = [a.register_hook(watch(n)) for n, a in zip(names, activations)]
        try:
            backward(logits[:, 0].sum(), activations)
        finally:
            for handle in handles:
                handle.remove()
    return alive


def test_each_gradient_is_freed_once_used():
    """When the earliest layer's gradient arrives, the later layers' gradients are gone; requesting them
    all from ``autograd.grad`` (as the floor does) holds them until it returns."""
    assert _alive_at_the_earliest(_maps_during_backward) == [[False, False]]
    assert _alive_at_the_earliest(lambda objective, outputs: torch.autograd.grad(objective, outputs)) == [[True, True]]


class Chunked(nn.Module):
    """conv -> chunk(2): ``a`` (an Identity) on the first half, which nothing uses, ``b`` on the second, which
    feeds ``c3``. Autograd has no gradient for the unused piece: ``a``'s hook is called with None."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Identity()
        self.b = nn.Identity()
        self.c3 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        first, second = self.conv(x).chunk(2, dim=1)
        self.a(first)
        return self.fc(self.c3(self.b(second)).mean(dim=(2, 3)))


def test_an_output_without_gradient_gets_a_zero_map_and_the_rest_the_reference():
    model = Chunked().double().requires_grad_(False)
    got, _ = agrees_with_reference(model, x12(torch.float64), layers=["conv", "a", "b", "c3"])
    assert float(got.layer_scores[:, 1].abs().max()) == 0.0  # a
    assert float(got.layer_scores[:, [0, 2, 3]].abs().max()) > 0.0


class NoGradBackbone(nn.Module):
    """A linear probe: the conv runs under ``torch.no_grad()``, so the logits carry no graph back to it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.c1(x).relu()
        return self.fc(features.mean(dim=(2, 3)))


@pytest.mark.parametrize("frozen", [True, False])
def test_logits_that_reach_no_explained_layer_are_refused(frozen):
    """Not an all-zero explanation: the graph was cut, and the error says where to look."""
    model = NoGradBackbone().requires_grad_(not frozen)
    with pytest.raises(RuntimeError, match="depend on none of the explained layers"):
        Engine(model).explain(x12())
