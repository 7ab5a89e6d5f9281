"""Behaviour of the public Engine / Explanation API (the numerical agreement on real architectures is covered
by test_reference_agreement.py and is not repeated here).

Models: the session's seeded random ResNet18 (never mutated: tests that change a model's state work on a deep
copy) and tiny hand-built nets, at small inputs (B <= 4, 48 x 64 or smaller) so the file stays fast on 2 cores.

Tolerances:
* float64 engine vs the float64 reference (tests/reference.py): 1e-9 max abs (same precision, only summation
  order differs, ~1e-15 relative per op);
* float32 engine vs float32 engine (threads vs sequential, with_p vs a fresh explain, no_grad vs grad, a
  subset explained by a fresh Engine vs with_p on a subset): 1e-6 max abs on [0, 1] heatmaps. The same ops on
  the same values, at most a different reduction order;
* the same input given as PIL / numpy / torch uint8: bit-identical (the same network batch);
* one image alone vs inside a batch (float32): 1e-5 (batched convolutions may round differently).
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from reference import reference_combine, reference_network
from torch import nn

import wcam
from helpers import agrees_with_reference, hook_counts, max_diff
from wcam import Engine, ImageError, Preprocess
from wcam.engine.runner import TargetError

SHAPE = (48, 64)

# ------------------------------------------------------------------ helpers



def total_hooks(model: nn.Module) -> int:
    return sum(hook_counts(model).values())


def images(batch: int, seed: int, shape: tuple[int, int] = SHAPE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def uint8_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def count_forwards(model: nn.Module) -> tuple[list[int], object]:
    """A forward pre-hook on the root module counting network passes: ``(counter, handle)``."""
    counter = [0]

    def hook(module, inputs):
        counter[0] += 1

    return counter, model.register_forward_pre_hook(hook)


@pytest.fixture(scope="module")
def resnet(seeded_models) -> nn.Module:
    """The session's seeded random ResNet18 (eval, frozen). Shared: tests must not change it."""
    return seeded_models("resnet18")


@pytest.fixture(scope="module")
def resnet64(seeded_models) -> nn.Module:
    return copy.deepcopy(seeded_models("resnet18")).double()


# ------------------------------------------------------------------ tiny hand-built nets


class TinyNet(nn.Module):
    """conv1 (full size) -> ReLU -> max-pool -> conv2 (half size) -> ReLU -> global mean -> Linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x).relu(), 2)
        return self.fc(self.conv2(x).relu().mean(dim=(2, 3)))


class RaisingNet(TinyNet):
    """Raises after conv1 has run (so the engine's hooks are in place when it does)."""

    def forward(self, x):
        self.conv1(x)
        raise RuntimeError("boom in the middle of forward")


class NeverRunNet(TinyNet):
    """Has a Conv2d (``spare``) that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Conv2d(3, 2, 1)


def vgg_like(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).double()


# ------------------------------------------------------------------ hooks


def _add_caller_hooks(model: nn.Module, calls: Counter) -> list:
    """Hooks a user registered themselves: a forward hook, a forward pre-hook and a full backward hook."""
    return [
        model.layer1[0].conv1.register_forward_hook(lambda m, i, o: calls.update(["forward"])),
        model.layer2.register_forward_pre_hook(lambda m, i: calls.update(["pre"])),
        model.fc.register_full_backward_hook(lambda m, gi, go: calls.update(["backward"])),
    ]


def test_hooks_removed_after_success_and_callers_hooks_survive(resnet):
    model = copy.deepcopy(resnet)
    calls: Counter = Counter()
    handles = _add_caller_hooks(model, calls)
    during: list[int] = []
    handles.append(model.register_forward_pre_hook(lambda m, i: during.append(total_hooks(model))))
    before = hook_counts(model)
    x = images(2, seed=0)

    Engine(model).explain(x)

    assert during and during[0] > sum(before.values()), "the engine's hooks should be present during the call"
    assert hook_counts(model) == before
    # the caller's own hooks still work
    calls.clear()
    model(x.clone().requires_grad_(True)).sum().backward()
    assert calls == Counter({"forward": 1, "pre": 1, "backward": 1})
    for handle in handles:
        handle.remove()


def _failing_call(kind: str):
    """(model, call that raises, expected exception type, message fragment)."""
    torch.manual_seed(0)
    if kind == "target_out_of_range":  # raised after the forward pass, with hooks registered
        model = TinyNet(classes=5)
        return model, lambda engine: engine.explain(images(2, seed=1), targets=[1, 5]), TargetError, "5 classes"
    if kind == "forward_raises":
        model = RaisingNet()
        return model, lambda engine: engine.explain(images(2, seed=1)), RuntimeError, "boom"
    if kind == "layer_never_runs":
        model = NeverRunNet()
        return model, lambda engine: engine.explain(images(2, seed=1)), RuntimeError, "spare"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["target_out_of_range", "forward_raises", "layer_never_runs"])
def test_hooks_removed_after_a_failed_explain(kind):
    model, call, error, words = _failing_call(kind)
    calls: Counter = Counter()
    handles = [
        model.conv1.register_forward_hook(lambda m, i, o: calls.update(["forward"])),
        model.conv1.register_forward_pre_hook(lambda m, i: calls.update(["pre"])),
        model.fc.register_full_backward_hook(lambda m, gi, go: calls.update(["backward"])),
    ]
    during: list[int] = []
    handles.append(model.register_forward_pre_hook(lambda m, i: during.append(total_hooks(model))))
    before = hook_counts(model)
    engine = Engine(model)

    with pytest.raises(error, match=words):
        call(engine)

    assert during and during[0] > sum(before.values()), "the engine's hooks should be present during the call"
    assert hook_counts(model) == before
    assert calls["forward"] >= 1 and calls["pre"] >= 1  # the caller's hooks ran during the call
    # ... and are still registered and working afterwards
    if kind != "forward_raises":
        calls.clear()
        model(images(1, seed=2).requires_grad_(True)).sum().backward()
        assert calls == Counter({"forward": 1, "pre": 1, "backward": 1})
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------------ model state


def _stateful_resnet(resnet: nn.Module) -> nn.Module:
    """train() mode with layer2 set back to eval(); stem and layer1 frozen, the rest trainable."""
    model = copy.deepcopy(resnet)
    model.train()
    model.layer2.eval()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(("conv1.", "bn1.", "layer1.")))
    return model


@pytest.mark.parametrize("outcome", ["success", "target_out_of_range", "forward_raises_midway"])
def test_model_state_is_restored_and_untouched(resnet, outcome):
    model = _stateful_resnet(resnet)
    training = {name: m.training for name, m in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    assert len(set(training.values())) == 2 and len(set(requires_grad.values())) == 2  # really mixed
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert any(name.endswith("running_mean") for name in buffers)
    storage = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}

    modes_seen: list[bool] = []
    handles = [model.register_forward_pre_hook(lambda m, i: modes_seen.extend(x.training for x in model.modules()))]
    parameter_gradients: list[str] = []  # any gradient computed for a parameter, accumulated into .grad or not
    handles += [p.register_hook(lambda g, name=name: parameter_gradients.append(name))
                for name, p in model.named_parameters() if p.requires_grad]
    if outcome == "forward_raises_midway":  # after the stem, layer1 and layer2 batch norms have run

        def explode(module, inputs):
            raise RuntimeError("midway")

        handles.append(model.layer3.register_forward_pre_hook(explode))

    engine = Engine(model)
    x = images(2, seed=3)
    if outcome == "success":
        engine.explain(x)
    elif outcome == "target_out_of_range":
        with pytest.raises(TargetError):
            engine.explain(x, targets=1000)
    else:
        with pytest.raises(RuntimeError, match="midway"):
            engine.explain(x)
    for handle in handles:
        handle.remove()

    assert modes_seen and not any(modes_seen), "every module must be in eval mode during the call"
    assert {name: m.training for name, m in model.named_modules()} == training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []
    assert parameter_gradients == []
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), f"buffer {name} changed"
    # the channels-last input leaves the parameters where and as they were
    assert {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()} == storage


class CountingTrain(TinyNet):
    """Counts calls of ``train()`` (which ``eval()`` makes) on the model."""

    def __init__(self) -> None:
        super().__init__()
        self.train_calls = 0

    def train(self, mode: bool = True) -> "CountingTrain":
        self.train_calls += 1
        return super().train(mode)


def test_a_model_in_eval_mode_is_only_looked_at():
    """A model already in eval mode throughout is neither switched nor restored (the server's case, where
    both would cost time on every call); one in training mode still is, each call."""
    model = CountingTrain().eval()
    model.train_calls = 0
    engine = Engine(model)
    engine.explain(images(2, seed=4))
    assert model.train_calls == 0 and not any(m.training for m in model.modules())
    model.train()
    model.train_calls = 0
    engine.explain(images(2, seed=4))
    assert model.train_calls == 1 and all(m.training for m in model.modules())


class EqualByType(TinyNet):
    """Models that compare (and hash) equal by class: still two models, each with its own eval-mode guard."""

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))


def test_models_that_compare_equal_each_get_their_own_eval_mode_guard():
    from wcam.engine.runner import EvalGuard

    first, second = EqualByType(), EqualByType()
    assert first == second and EvalGuard.of(first) is not EvalGuard.of(second)
    assert EvalGuard.of(first) is EvalGuard.of(first)
    second.train()
    Engine(first).explain(images(1, seed=33))
    seen = []
    handle = second.register_forward_pre_hook(lambda m, i: seen.append(m.training))
    try:
        Engine(second).explain(images(1, seed=33))
    finally:
        handle.remove()
    assert seen == [False] and second.training  # in eval mode during the call, restored after


class PausingNet(TinyNet):
    """A model with a batch norm; a call from a thread in ``gates`` stops after conv1, sets the thread's
    ``paused`` event and waits for its ``resume`` event."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.gates: dict[int, tuple[threading.Event, threading.Event]] = {}

    def forward(self, x):
        x = self.conv1(x)
        gate = self.gates.get(threading.get_ident())
        if gate is not None:
            gate[0].set()
            assert gate[1].wait(timeout=60)
        x = nn.functional.max_pool2d(self.bn(x).relu(), 2)
        return self.fc(self.conv2(x).relu().mean(dim=(2, 3)))


def test_two_engines_on_one_model_keep_it_in_eval_mode_for_each_other():
    """On a model in training mode, engine B's call starts first and ends while engine A's is mid-forward: the
    model must stay in eval mode for A (one guard per model, not per engine), or A's batch norm would
    normalise by batch statistics and update the running ones."""
    torch.manual_seed(30)
    model = PausingNet().train()
    torch.manual_seed(30)
    expected = Engine(PausingNet().train()).explain(x := images(2, seed=31))
    running = model.bn.running_mean.clone()
    engines = {"A": Engine(model), "B": Engine(model, layers=["conv2"])}
    gates = {name: (threading.Event(), threading.Event()) for name in engines}
    got = {}

    def explain(name: str) -> None:
        model.gates[threading.get_ident()] = gates[name]
        got[name] = engines[name].explain(x)

    threads = {name: threading.Thread(target=explain, args=(name,)) for name in engines}
    try:
        for name in ("B", "A"):  # B enters first, then A, each pausing mid-forward
            threads[name].start()
            assert gates[name][0].wait(timeout=60)
        gates["B"][1].set()
        threads["B"].join()  # B has left while A is still inside
    finally:
        for paused, resume in gates.values():
            resume.set()
        for thread in threads.values():
            thread.join()
    assert max_diff(got["A"].heatmaps, expected.heatmaps) <= 1e-6
    assert torch.equal(model.bn.running_mean, running)
    assert all(m.training for m in model.modules())


# ------------------------------------------------------------------ memory layout of the network input


def _input_layouts(model: nn.Module) -> tuple[list[bool], object]:
    """A forward pre-hook recording whether each network input is channels-last (and not also contiguous)."""
    seen: list[bool] = []

    def hook(module, inputs):
        x = inputs[0]
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    return seen, model.register_forward_pre_hook(hook)


def test_channels_last_input_on_cpu_gives_the_same_explanation(resnet64):
    x = images(2, seed=11).double()
    seen, handle = _input_layouts(resnet64)
    try:
        default = Engine(resnet64).explain(x, p=70.0)
        plain = Engine(resnet64, channels_last=False).explain(x, p=70.0)
    finally:
        handle.remove()
    assert seen == [True, False]
    assert default.targets.tolist() == plain.targets.tolist()
    for got, want in ((default.heatmaps, plain.heatmaps), (default.sums, plain.sums),
                      (default.layer_scores, plain.layer_scores), (default.layer_weights, plain.layer_weights)):
        assert max_diff(got, want) <= 1e-9


class ViewNet(TinyNet):
    """Flattens a 4-D map with ``view``, which a channels-last tensor cannot give."""

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x).relu(), 2)
        x = nn.functional.adaptive_avg_pool2d(self.conv2(x).relu(), 2)
        return self.fc2(x.view(x.shape[0], -1))

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.Linear(8 * 4, 5)


def test_a_model_that_needs_contiguous_input_falls_back_once():
    torch.manual_seed(0)
    model = ViewNet().double()
    x = images(2, seed=12).double()
    with pytest.raises(RuntimeError, match="view"):
        model(x.contiguous(memory_format=torch.channels_last))
    want = Engine(model, channels_last=False).explain(x, p=50.0)
    engine = Engine(model)
    seen, handle = _input_layouts(model)
    try:
        first = engine.explain(x, p=50.0)  # fails in channels-last, runs again as given
        second = engine.explain(x, p=50.0)
    finally:
        handle.remove()
    assert seen == [True, False, False] and engine._runner.channels_last is False
    assert total_hooks(model) == 0
    for got in (first, second):
        assert max_diff(got.heatmaps, want.heatmaps) <= 1e-9 and max_diff(got.layer_scores, want.layer_scores) <= 1e-9


# ------------------------------------------------------------------ grad modes


def test_explain_inside_no_grad_equals_outside(resnet):
    engine = Engine(resnet)
    x = images(2, seed=4)
    outside = engine.explain(x, targets=[7, 300], p=50.0)
    with torch.no_grad():
        inside = engine.explain(x, targets=[7, 300], p=50.0)
        assert not torch.is_grad_enabled()
    assert float(outside.heatmaps.amax()) == 1.0 and float(outside.layer_scores.amax()) > 0  # non-trivial
    assert max_diff(inside.heatmaps, outside.heatmaps) <= 1e-6
    assert max_diff(inside.layer_scores, outside.layer_scores) <= 1e-6 * float(outside.layer_scores.abs().max())
    assert inside.targets.tolist() == [7, 300]


def test_inference_mode_is_refused_and_inference_tensors_work_afterwards(resnet):
    engine = Engine(resnet, preprocess=Preprocess(size=SHAPE))
    before = hook_counts(resnet)
    x = images(2, seed=5)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            engine.explain(x)
        frozen = x.clone()
        picture = torch.from_numpy(uint8_image(40, 50, seed=0)).permute(2, 0, 1).clone()
    assert hook_counts(resnet) == before
    assert frozen.is_inference() and picture.is_inference()

    expected = engine.explain(x, p=75.0)
    got = engine.explain(frozen, p=75.0)
    assert max_diff(got.heatmaps, expected.heatmaps) <= 1e-6
    assert got.targets.tolist() == expected.targets.tolist()

    from_uint8 = engine.explain(picture)
    plain = engine.explain(torch.from_numpy(uint8_image(40, 50, seed=0)).permute(2, 0, 1))
    assert max_diff(from_uint8.heatmaps, plain.heatmaps) <= 1e-6
    assert frozen.is_inference()  # the caller's tensor is left as it was


# ------------------------------------------------------------------ threads


def _thread_tasks() -> list[tuple[torch.Tensor, object, float]]:
    """8 different jobs: different images, batch sizes, targets (explicit or argmax) and p."""
    ps = [0.0, 12.5, 37.5, 50.0, 66.0, 90.0, 99.0, 100.0]
    tasks = []
    for i, p in enumerate(ps):
        batch = 1 + i % 3
        targets = None if i % 2 == 0 else [(97 * i + 13 * b) % 1000 for b in range(batch)]
        tasks.append((images(batch, seed=100 + i), targets, p))
    return tasks


def test_one_engine_shared_by_8_threads_gives_the_sequential_results(resnet):
    engine = Engine(resnet)
    tasks = _thread_tasks()
    before = hook_counts(resnet)
    sequential = [engine.explain(x, targets=t, p=p) for x, t, p in tasks]
    barrier = threading.Barrier(len(tasks))

    def job(task):
        x, targets, p = task
        barrier.wait(timeout=60)
        return engine.explain(x, targets=targets, p=p)

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(job, tasks))
        for i, (got, want) in enumerate(zip(results, sequential)):
            assert got.targets.tolist() == want.targets.tolist(), f"task {i}"
            assert got.p == want.p
            assert max_diff(got.heatmaps, want.heatmaps) <= 1e-6, f"task {i}"
            assert max_diff(got.layer_weights, want.layer_weights) <= 1e-6, f"task {i}"
    assert hook_counts(resnet) == before
    assert not any(m.training for m in resnet.modules())


def test_threads_on_a_fresh_engine_with_inplace_relu_match_the_reference():
    """The in-place detection of the first call(s) runs concurrently in 8 threads."""
    model = vgg_like(seed=3)
    tasks = [images(1 + i % 2, seed=200 + i, shape=(20, 24), dtype=torch.float64) for i in range(8)]
    nets = [reference_network(model, x, ["0", "2"]) for x in tasks]
    engine = Engine(model)
    before = hook_counts(model)
    barrier = threading.Barrier(len(tasks))

    def job(x):
        barrier.wait(timeout=60)
        return engine.explain(x, p=90.0)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(job, tasks))
    for i, (got, net) in enumerate(zip(results, nets)):
        assert max_diff(got.heatmaps, reference_combine(net, p=90.0)["heatmaps"]) <= 1e-9, f"task {i}"
        assert max_diff(got.layer_scores, net["scores"]) <= 1e-9, f"task {i}"
    assert hook_counts(model) == before


# ------------------------------------------------------------------ with_p


@pytest.fixture(scope="module")
def resnet_explained(resnet):
    engine = Engine(resnet)
    x = images(3, seed=6)
    return engine, x, engine.explain(x, p=90.0)


@pytest.mark.parametrize("p", [0.0, 37.5, 100.0])
def test_with_p_equals_a_fresh_explain(resnet_explained, p):
    engine, x, explanation = resnet_explained
    fresh = engine.explain(x, p=p)
    got = explanation.with_p(p)
    assert got.p == p and got.method == "winsor"
    assert max_diff(got.heatmaps, fresh.heatmaps) <= 1e-6
    assert max_diff(got.sums, fresh.sums) <= 1e-6 * max(1.0, float(fresh.sums.abs().max()))
    assert max_diff(got.layer_weights, fresh.layer_weights) <= 1e-6
    assert got.image_sizes == fresh.image_sizes


def test_with_p_costs_no_network_pass(resnet):
    engine = Engine(resnet)
    counter, handle = count_forwards(resnet)
    try:
        explanation = engine.explain(images(2, seed=7), p=90.0)
        after_explain = counter[0]
        assert after_explain == 1  # one forward per explain (the spec), and the counter does count it
        for p in (0.0, 37.5, 100.0):
            explanation.with_p(p)
        explanation.with_p(50.0, layers=slice(2, 9))
        explanation.with_p(50.0, layers=[0, 4, -1])
    finally:
        handle.remove()
    assert counter[0] == after_explain


@pytest.mark.parametrize(
    "selection",
    [slice(3, 12), slice(10, None), "names", "indices"],
    ids=["slice-3-12", "slice-10-end", "names", "indices"],
)
@pytest.mark.parametrize("p", [0.0, 37.5, 100.0])
def test_with_p_on_a_layer_subset_equals_an_engine_on_those_layers(resnet, resnet_explained, selection, p):
    engine, x, explanation = resnet_explained
    all_names = explanation.layer_names
    picked = [0, 5, 7, 12, len(all_names) - 1]
    if selection == "names":
        names = [all_names[i] for i in picked]
        got = explanation.with_p(p, layers=list(reversed(names)))  # order does not matter
        indices = picked
    elif selection == "indices":
        got = explanation.with_p(p, layers=[0, 5, 7, 12, -1])
        indices = picked
    else:
        got = explanation.with_p(p, layers=selection)
        indices = list(range(len(all_names)))[selection]
    names = [all_names[i] for i in indices]
    fresh = Engine(resnet, layers=names).explain(x, p=p)
    assert fresh.layer_names == names
    assert max_diff(got.heatmaps, fresh.heatmaps) <= 1e-6
    assert max_diff(got.layer_weights[:, indices], fresh.layer_weights) <= 1e-6
    outside = [i for i in range(len(all_names)) if i not in indices]
    assert float(got.layer_weights[:, outside].abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_with_p_takes_numpy_and_torch_integer_indices(resnet_explained, kind):
    _, _, explanation = resnet_explained
    indices = np.array([0, 5, -1]) if kind == "numpy" else torch.tensor([0, 5, -1])
    got = explanation.with_p(50.0, layers=indices)
    want = explanation.with_p(50.0, layers=[0, 5, -1])
    assert torch.equal(got.heatmaps, want.heatmaps)
    with pytest.raises(wcam.UnknownLayerError, match="out of range"):
        explanation.with_p(50.0, layers=np.array([0, 99]))
    with pytest.raises(wcam.UnknownLayerError, match="out of range"):
        explanation.with_p(50.0, layers=[True])  # a bool is no layer index


def test_heatmap_takes_negative_indices_like_a_list(resnet_explained):
    _, _, explanation = resnet_explained
    last = len(explanation) - 1
    assert torch.equal(explanation.heatmap(-1), explanation.heatmap(last))
    with pytest.raises(IndexError):
        explanation.heatmap(len(explanation))


def test_with_p_unknown_layer_name_lists_close_names(resnet_explained):
    _, _, explanation = resnet_explained
    with pytest.raises(wcam.UnknownLayerError) as info:
        explanation.with_p(50.0, layers=["layer1.0.conv"])
    message = str(info.value)
    assert "layer1.0.conv" in message and "layer1.0.conv1" in message


@pytest.mark.parametrize("layers", [slice(5, 5), slice(30, 40), []], ids=["slice-5-5", "slice-past-end", "list"])
def test_with_p_empty_selection_raises(resnet_explained, layers):
    _, _, explanation = resnet_explained
    with pytest.raises(ValueError, match="empty"):
        explanation.with_p(50.0, layers=layers)


# ------------------------------------------------------------------ methods


def _last_conv(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


def test_gradcam_defaults_to_the_last_conv2d(resnet64):
    engine = Engine(resnet64)
    x = images(2, seed=8, dtype=torch.float64)
    got = engine.explain(x, method="gradcam")
    assert got.layer_names == [_last_conv(resnet64)] == ["layer4.1.conv2"]
    assert got.method == "gradcam"
    assert got.layer_weights.tolist() == [[1.0], [1.0]]
    ref = reference_combine(reference_network(resnet64, x, ["layer4.1.conv2"]), method="gradcam")
    assert max_diff(got.heatmaps, ref["heatmaps"]) <= 1e-9


@pytest.mark.parametrize("layers", [["layer2.0.conv1"], "layer2.0.conv1"], ids=["list", "str"])
def test_gradcam_on_a_chosen_layer(resnet64, layers):
    engine = Engine(resnet64)
    x = images(2, seed=9, dtype=torch.float64)
    got = engine.explain(x, method="gradcam", layers=layers)
    assert got.layer_names == ["layer2.0.conv1"]
    ref = reference_combine(reference_network(resnet64, x, ["layer2.0.conv1"]), method="gradcam")
    assert max_diff(got.heatmaps, ref["heatmaps"]) <= 1e-9
    assert max_diff(got.sums, ref["sums"]) <= 1e-9


def test_gradcam_with_two_layers_raises(resnet):
    with pytest.raises(ValueError, match="one layer"):
        Engine(resnet).explain(images(1, seed=10), method="gradcam", layers=["conv1", "layer1.0.conv1"])


def test_layer_mean_weights_are_one_over_l(resnet):
    engine = Engine(resnet)
    got = engine.explain(images(2, seed=11), method="layer_mean")
    count = len(engine.layers)
    assert got.layer_names == engine.layers and count == 20
    assert got.method == "layer_mean"
    assert max_diff(got.layer_weights, torch.full((2, count), 1.0 / count)) <= 1e-7
    # and with an explicit layer subset
    sub = engine.explain(images(2, seed=11), method="layer_mean", layers=engine.layers[:3])
    assert max_diff(sub.layer_weights, torch.full((2, 3), 1.0 / 3)) <= 1e-7


# ------------------------------------------------------------------ in-place ReLU (VGG style)


def test_inplace_relu_after_conv_uses_raw_conv_outputs():
    model = vgg_like(seed=0)
    engine = Engine(model)
    assert engine.layers == ["0", "2"]
    x = images(2, seed=12, shape=(20, 24), dtype=torch.float64)
    net = reference_network(model, x, engine.layers)
    # premise: the raw conv outputs have negative entries, which an in-place ReLU would overwrite
    assert all((a < 0).any() for a in net["activations"])
    counter, handle = count_forwards(model)
    try:
        for call in (1, 2):
            start = counter[0]
            got = engine.explain(x, p=90.0)
            assert max_diff(got.layer_scores, net["scores"]) <= 1e-9, f"call {call}"
            for p in (0.0, 50.0, 90.0, 100.0):
                ref = reference_combine(net, p=p)
                fresh = got if p == 90.0 else engine.explain(x, p=p)
                assert max_diff(fresh.heatmaps, ref["heatmaps"]) <= 1e-9, f"call {call} p={p}"
                assert max_diff(fresh.sums, ref["sums"]) <= 1e-9, f"call {call} p={p}"
            if call == 2:
                assert counter[0] - start == 4, "once the in-place layers are known, one forward per explain"
    finally:
        handle.remove()


# ------------------------------------------------------------------ edge cases vs the reference (float64)




class NegativeNet(nn.Module):
    """Non-negative features into negative final weights for class 0: every gradient is <= 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv2.weight.abs_()
            self.conv2.bias.uniform_(0.1, 0.5)
            self.fc.weight[0].copy_(-self.fc.weight[0].abs() - 0.1)

    def forward(self, x):
        x = self.conv2(self.conv1(x).relu()).relu()
        return self.fc(x.mean(dim=(2, 3)))


def test_all_scores_non_positive_give_zero_weights_and_a_zero_heatmap():
    model = NegativeNet().double()
    x = images(2, seed=13, shape=(12, 16), dtype=torch.float64)
    got, net = agrees_with_reference(model, x, targets=[0, 0])
    # premise: every raw layer score is strictly negative
    for layer, grads in enumerate(net["gradients"]):
        assert (grads.reshape(2, -1).mean(axis=1) < 0).all(), layer
    assert float(got.layer_weights.abs().max()) == 0.0
    assert float(got.heatmaps.abs().max()) == 0.0 and float(got.sums.abs().max()) == 0.0
    assert float(got.heatmap(0).abs().max()) == 0.0


class TwinNet(nn.Module):
    """Two identical branches: both layers get exactly the same score."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.b.load_state_dict(self.a.state_dict())
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.abs_()

    def forward(self, x):
        return self.fc((self.a(x).relu() + self.b(x).relu()).mean(dim=(2, 3)))


def test_all_scores_equal_give_weight_one():
    model = TwinNet().double()
    x = images(2, seed=14, shape=(12, 16), dtype=torch.float64)
    got, net = agrees_with_reference(model, x, targets=[0, 2])
    assert (net["scores"] > 0).all() and (net["scores"][:, 0] == net["scores"][:, 1]).all()  # premise
    for p in (0.0, 50.0, 100.0):
        assert got.with_p(p).layer_weights.tolist() == [[1.0, 1.0], [1.0, 1.0]], f"p={p}"


def test_single_layer_net():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).double()
    with torch.no_grad():
        model[4].weight.abs_()
    x = images(2, seed=15, shape=(12, 16), dtype=torch.float64)
    got, net = agrees_with_reference(model, x)
    assert (net["scores"] > 0).all()
    assert got.layer_weights.tolist() == [[1.0], [1.0]]
    gradcam = Engine(model).explain(x, method="gradcam")
    assert max_diff(gradcam.heatmaps, got.heatmaps) <= 1e-12


def test_single_layer_of_a_resnet(resnet64):
    x = images(2, seed=16, dtype=torch.float64)
    got, _ = agrees_with_reference(resnet64, x, layers=["layer3.0.conv1"])
    assert got.layer_names == ["layer3.0.conv1"]


class ConstantNet(nn.Module):
    """``zero`` has zero weights and a bias: its output, and so its map, is constant per image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.zero = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(13, 4)
        with torch.no_grad():
            self.zero.weight.zero_()
            self.zero.bias.uniform_(0.1, 1.0)
            self.fc.weight.abs_()

    def forward(self, x):
        return self.fc(torch.cat([self.conv(x).relu().mean(dim=(2, 3)), self.zero(x).mean(dim=(2, 3))], dim=1))


def test_constant_layer_map_is_all_zeros():
    model = ConstantNet().double()
    x = images(3, seed=17, shape=(13, 19), dtype=torch.float64)
    got, net = agrees_with_reference(model, x)
    assert got.layer_names == ["conv", "zero"]
    assert (net["scores"][:, 1] > 0).all()  # premise: the constant layer does get a weight
    assert float(got.layer_weights[:, 1].min()) > 0
    indices, maps = got.layer_maps.groups[(13, 19)]
    zero_map = maps[:, indices.index(1)]
    assert float(zero_map.abs().max()) == 0.0
    assert float(maps[:, indices.index(0)].amax()) == 1.0


class OneByOneNet(nn.Module):
    """``head`` outputs 1 x 1 spatially."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.head(self.pool(self.conv(x).relu())).relu().flatten(1))


def test_layer_with_1x1_spatial_output():
    model = OneByOneNet().double()
    x = images(2, seed=18, shape=(15, 22), dtype=torch.float64)
    got, _ = agrees_with_reference(model, x)
    assert {size: indices for size, (indices, _) in got.layer_maps.groups.items()} == {(15, 22): [0], (1, 1): [1]}


class DeadBranchNet(nn.Module):
    """``dead`` runs but its output never reaches the logits (its gradient is None)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.used = nn.Conv2d(3, 4, 3, padding=1)
        self.dead = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.dead(x)
        return self.fc(self.used(x).relu().mean(dim=(2, 3)))


def test_layer_that_does_not_reach_the_logit_gets_zeros():
    model = DeadBranchNet().double()
    x = images(2, seed=19, shape=(12, 16), dtype=torch.float64)
    got, net = agrees_with_reference(model, x)
    assert got.layer_names == ["used", "dead"]
    assert float(got.layer_scores[:, 1].abs().max()) == 0.0
    assert float(got.layer_weights[:, 1].abs().max()) == 0.0
    indices, maps = got.layer_maps.groups[(6, 8)]
    assert float(maps.abs().max()) == 0.0


# ------------------------------------------------------------------ preprocessing


@pytest.fixture(scope="module")
def small_engine(resnet):
    return Engine(resnet, preprocess=Preprocess(size=SHAPE))


def test_pil_numpy_and_torch_uint8_give_identical_heatmaps(small_engine):
    array = uint8_image(60, 90, seed=1)
    forms = {
        "pil": Image.fromarray(array),
        "numpy": array,
        "torch": torch.from_numpy(array.copy()).permute(2, 0, 1),
    }
    results = {name: small_engine.explain(form, p=80.0) for name, form in forms.items()}
    base = results["numpy"]
    assert base.image_sizes == [(60, 90)]
    assert tuple(base.heatmaps.shape) == (1, *SHAPE)
    for name, got in results.items():
        assert got.image_sizes == [(60, 90)], name
        assert torch.equal(got.heatmaps, base.heatmaps), name
        assert torch.equal(got.targets, base.targets), name
    together = small_engine.explain(list(forms.values()), p=80.0)
    assert together.image_sizes == [(60, 90)] * 3
    for i in range(3):
        assert max_diff(together.heatmaps[i], base.heatmaps[0]) <= 1e-5
    # heatmap(i): the original size, values in [0, 1]
    full = base.heatmap(0)
    assert tuple(full.shape) == (60, 90)
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0 and float(full.max()) == 1.0
    assert tuple(base.heatmap(0, size=(10, 20)).shape) == (10, 20)


def test_images_of_different_sizes_in_one_batch(small_engine):
    pictures = [
        uint8_image(60, 90, seed=2),
        Image.fromarray(uint8_image(33, 47, seed=3)),
        torch.from_numpy(uint8_image(40, 70, seed=4)).permute(2, 0, 1).contiguous(),
        uint8_image(*SHAPE, seed=5),  # already the network size
    ]
    sizes = [(60, 90), (33, 47), (40, 70), SHAPE]
    got = small_engine.explain(pictures, p=90.0)
    assert got.image_sizes == sizes
    assert tuple(got.heatmaps.shape) == (4, *SHAPE)
    for i, (picture, size) in enumerate(zip(pictures, sizes)):
        single = small_engine.explain(picture, p=90.0)
        assert single.targets.tolist() == [int(got.targets[i])]
        assert max_diff(got.heatmaps[i], single.heatmaps[0]) <= 1e-5, i
        hm = got.heatmap(i)
        assert tuple(hm.shape) == size, i
        assert float(hm.min()) >= 0.0 and float(hm.max()) <= 1.0, i


def test_uint8_numpy_batch_equals_list(small_engine):
    batch = np.stack([uint8_image(30, 40, seed=s) for s in (6, 7)])
    got = small_engine.explain(batch)
    listed = small_engine.explain(list(batch))
    assert got.image_sizes == [(30, 40), (30, 40)]
    assert torch.equal(got.heatmaps, listed.heatmaps)
    # a B x 3 x H x W uint8 tensor (video frames) is resized as one batch: the same network input
    frames = torch.from_numpy(batch).permute(0, 3, 1, 2)
    as_tensor = small_engine.explain(frames)
    assert as_tensor.image_sizes == [(30, 40), (30, 40)]
    assert torch.equal(as_tensor.heatmaps, listed.heatmaps)
    with pytest.raises(ImageError, match="empty"):
        small_engine.explain(frames[:, :, :0])


# ------------------------------------------------------------------ the packaged pretrained model


def test_from_name_lite0_predicts_egyptian_cat(photos):
    engine = Engine.from_name("efficientnet_lite0")
    got = engine.explain(photos["chelsea"])
    assert engine.categories[int(got.targets[0])] == "Egyptian cat"
    assert got.image_sizes == [photos["chelsea"].shape[:2]]
    assert tuple(got.heatmap(0).shape) == photos["chelsea"].shape[:2]


def test_efficientnet_b0_preset_filters_the_authors_names():
    """The spec's EfficientNet-B0 preset, by name as the authors' code applies it: 18 of 81 convs; stage 1's
    block has no expand conv, so ``block.0.0`` there is its depthwise conv (dropped) and its project conv
    ``block.2.0`` stays."""
    from torchvision.models import efficientnet_b0

    from wcam.engine.layers import conv_layers, preset_layers

    model = efficientnet_b0()
    layers = preset_layers(model)
    assert len(conv_layers(model)) == 81 and len(layers) == 18
    assert layers[:3] == ["features.0.0", "features.1.0.block.2.0", "features.2.0.block.1.0"]
    assert not any(part in name for name in layers for part in ("fc1", "fc2", "block.0.0", "block.3.0"))
    assert layers[-1] == "features.8.0" and Engine(model).layers == layers


def test_inception_v3_preset_drops_the_auxiliary_head():
    from torchvision.models import inception_v3

    from wcam.engine.layers import conv_layers, preset_layers

    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    layers = preset_layers(model)
    aux = [n for n in conv_layers(model) if n.startswith("AuxLogits.")]
    assert aux and len(layers) == 94 and layers == [n for n in conv_layers(model) if n not in aux]


def test_an_inception_weights_file_gets_the_pretrained_input_transform(tmp_path):
    """torchvision's pretrained InceptionV3 re-normalises its input (``transform_input``), which a state dict
    does not record; a file (typically a fine-tune of those weights) must get the same, as DEFAULT does."""
    from torchvision.models import inception_v3

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "ft.pt")
    engine = Engine.from_name("inception_v3", weights=str(tmp_path / "ft.pt"))
    assert engine.model.transform_input is True
    assert Engine.from_name("inception_v3", weights=None).model.transform_input is False  # random: as built
