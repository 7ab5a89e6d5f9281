"""Self-checks of the building blocks of tests/reference.py on tiny hand-computed inputs.

These tests check the reference itself (not the engine): resamplers, quantile, weight rule, min-max and the
raw-activation hooking on a tiny network with an in-place ReLU.
"""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference import (  # noqa: E402
    bilinear_matrix,
    minmax,
    nearest_matrix,
    quantile_linear,
    reference_cam,
    resize_2d,
    winsor_weights,
)


# ------------------------------------------------------------------ bilinear (align_corners=False)

def test_bilinear_matrix_2_to_4():
    # scale = 2/4 = 0.5, src = (d + 0.5) * 0.5 - 0.5:
    # d=0: -0.25 -> clamped 0   -> i0=0, i1=1, lam=0    -> [1, 0]
    # d=1:  0.25                -> i0=0, i1=1, lam=0.25 -> [0.75, 0.25]
    # d=2:  0.75                -> i0=0, i1=1, lam=0.75 -> [0.25, 0.75]
    # d=3:  1.25                -> i0=1, i1=1 (edge)    -> [0, 1]
    expected = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    np.testing.assert_allclose(bilinear_matrix(2, 4), expected, rtol=0, atol=1e-15)


def test_bilinear_upsample_2x2_to_4x4():
    m = np.array([[0.0, 4.0], [8.0, 12.0]])
    # rows with weights above: r0=[0,4], r1=.75*[0,4]+.25*[8,12]=[2,6], r2=[6,10], r3=[8,12];
    # each row [a,b] -> [a, .75a+.25b, .25a+.75b, b]
    expected = np.array([
        [0.0, 1.0, 3.0, 4.0],
        [2.0, 3.0, 5.0, 6.0],
        [6.0, 7.0, 9.0, 10.0],
        [8.0, 9.0, 11.0, 12.0],
    ])
    np.testing.assert_allclose(resize_2d(m, (4, 4), "bilinear"), expected, rtol=0, atol=1e-12)


def test_bilinear_downsample_3x3_to_2x2():
    # scale = 3/2 = 1.5; src = (d + 0.5) * 1.5 - 0.5: d=0 -> 0.25 (0.75*v0 + 0.25*v1),
    # d=1 -> 1.75 (0.25*v1 + 0.75*v2). m[r, c] = 3r + c is linear, so out = 3*src_r + src_c:
    # (0.25,0.25) -> 1.0, (0.25,1.75) -> 2.5, (1.75,0.25) -> 5.5, (1.75,1.75) -> 7.0
    m = np.arange(9, dtype=np.float64).reshape(3, 3)
    expected = np.array([[1.0, 2.5], [5.5, 7.0]])
    np.testing.assert_allclose(resize_2d(m, (2, 2), "bilinear"), expected, rtol=0, atol=1e-12)


def test_bilinear_identity_and_rectangular():
    m = np.random.default_rng(1).standard_normal((3, 5))
    np.testing.assert_allclose(resize_2d(m, (3, 5), "bilinear"), m, rtol=0, atol=1e-15)
    # 1 x 2 -> 1 x 3 along width: scale 2/3, src = (d+0.5)*2/3 - 0.5 = -1/6 -> 0, 1/2, 7/6 -> edge
    np.testing.assert_allclose(resize_2d(np.array([[2.0, 8.0]]), (1, 3), "bilinear"), [[2.0, 5.0, 8.0]],
                               rtol=0, atol=1e-12)


# ------------------------------------------------------------------ nearest (torch legacy)

def test_nearest_upsample_2x2_to_4x4():
    # src = floor(d * 2/4) = 0, 0, 1, 1 on both axes
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    expected = np.array([
        [1.0, 1.0, 2.0, 2.0],
        [1.0, 1.0, 2.0, 2.0],
        [3.0, 3.0, 4.0, 4.0],
        [3.0, 3.0, 4.0, 4.0],
    ])
    np.testing.assert_array_equal(resize_2d(m, (4, 4), "nearest"), expected)


def test_nearest_downsample_3x3_to_2x2():
    # src = floor(d * 3/2) = 0, 1 on both axes -> rows/cols 0 and 1
    m = np.arange(9, dtype=np.float64).reshape(3, 3)
    np.testing.assert_array_equal(resize_2d(m, (2, 2), "nearest"), [[0.0, 1.0], [3.0, 4.0]])


def test_nearest_3_to_5_and_float32_rounding():
    # 3 -> 5: floor(d * 0.6) = 0, 0, 1, 1, 2
    assert np.argmax(nearest_matrix(3, 5), axis=1).tolist() == [0, 0, 1, 1, 2]
    # 14 -> 46 at d = 23: exactly 23*14/46 = 7, but float32(14/46) = 0.3043478 < 7/23 and the float32
    # product is 6.9999995, so torch's float32 kernel (and the reference) pick 6.
    assert np.argmax(nearest_matrix(14, 46), axis=1)[23] == 6


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resamplers_match_torch_float32_kernels(mode):
    # Cross-check (outside the reference) against F.interpolate on float32 inputs for many size pairs.
    rng = np.random.default_rng(0)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    for h, w, H, W in [(2, 2, 4, 4), (3, 3, 2, 2), (7, 7, 224, 224), (14, 14, 46, 46), (56, 28, 299, 17),
                       (5, 9, 3, 31), (1, 1, 6, 4), (13, 11, 13, 11), (112, 112, 7, 7)]:
        m = rng.standard_normal((h, w)).astype(np.float32)
        ours = resize_2d(m.astype(np.float64), (H, W), mode)
        theirs = F.interpolate(torch.from_numpy(m)[None, None], size=(H, W), mode=mode, **kw)[0, 0].double().numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ quantile

def test_quantile_hand_example():
    # sorted [0.1, 0.2, 0.3, 0.4]; q = 0.5 -> pos 1.5 -> 0.2 + 0.5 * 0.1 = 0.25
    assert quantile_linear([0.4, 0.1, 0.3, 0.2], 0.5) == pytest.approx(0.25, abs=1e-15)
    # q = 0.9 -> pos 2.7 -> 0.3 + 0.7 * 0.1 = 0.37
    assert quantile_linear([0.4, 0.1, 0.3, 0.2], 0.9) == pytest.approx(0.37, abs=1e-15)
    assert quantile_linear([5.0], 0.3) == 5.0


def test_quantile_matches_numpy():
    rng = np.random.default_rng(123)
    for n in [1, 2, 3, 5, 10, 53, 120]:
        v = rng.standard_normal(n)
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.999, 1.0]:
            assert quantile_linear(v, q) == pytest.approx(float(np.quantile(v, q)), rel=1e-13, abs=1e-14)


# ------------------------------------------------------------------ weight rule (spec steps 7-8)

def test_weights_none_positive():
    np.testing.assert_array_equal(winsor_weights([0.0, 0.0, 0.0], 90), [0.0, 0.0, 0.0])


def test_weights_p_zero():
    # P = {1, 2, 3}; p = 0 -> t = 1 on P -> all equal -> w = 1 on P, 0 outside
    np.testing.assert_array_equal(winsor_weights([0.0, 0.2, 0.5, 0.1], 0), [0.0, 1.0, 1.0, 1.0])


def test_weights_all_equal():
    # P = {0, 1}; tau = 0.3; t = [0.3, 0.3] -> equal -> 1
    np.testing.assert_array_equal(winsor_weights([0.3, 0.3, 0.0], 90), [1.0, 1.0, 0.0])


def test_weights_single_positive():
    np.testing.assert_array_equal(winsor_weights([0.0, 0.5], 90), [0.0, 1.0])


def test_weights_generic_p50():
    # s = [0.1, 0.2, 0.4, 0.0, 0.3]; P values sorted [0.1, 0.2, 0.3, 0.4]; p = 50 -> tau = 0.25
    # t = [0.1, 0.2, 0.25, -, 0.25]; range 0.15
    # w0 = 0.1; w1 = 0.1 + 0.9 * 0.1/0.15 = 0.7; w2 = w4 = 1.0; w3 = 0
    np.testing.assert_allclose(winsor_weights([0.1, 0.2, 0.4, 0.0, 0.3], 50),
                               [0.1, 0.7, 1.0, 0.0, 1.0], rtol=0, atol=1e-12)


def test_weights_generic_p100_and_p90():
    s = [0.1, 0.2, 0.4, 0.0, 0.3]
    # p = 100: tau = 0.4 = max, t = s on P, range 0.3:
    # w0 = 0.1, w1 = 0.1 + 0.9 * 0.1/0.3 = 0.4, w2 = 1, w4 = 0.1 + 0.9 * 0.2/0.3 = 0.7
    np.testing.assert_allclose(winsor_weights(s, 100), [0.1, 0.4, 1.0, 0.0, 0.7], rtol=0, atol=1e-12)
    # p = 90: tau = 0.37, t = [0.1, 0.2, 0.37, -, 0.3], range 0.27:
    # w1 = 0.1 + 0.9 * 0.1/0.27 = 0.1 + 1/3, w4 = 0.1 + 0.9 * 0.2/0.27 = 0.1 + 2/3
    np.testing.assert_allclose(winsor_weights(s, 90), [0.1, 0.1 + 1 / 3, 1.0, 0.0, 0.1 + 2 / 3],
                               rtol=0, atol=1e-12)


# ------------------------------------------------------------------ min-max

def test_minmax():
    np.testing.assert_array_equal(minmax(np.full((2, 3), 7.0)), np.zeros((2, 3)))
    np.testing.assert_allclose(minmax(np.array([[1.0, 3.0], [5.0, 2.0]])), [[0.0, 0.5], [1.0, 0.25]])


# ------------------------------------------------------------------ hooking: raw (pre in-place ReLU) output

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_hook_uses_pre_relu_activation_and_gradient():
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(1, 1, 5, 5)
    # hand computation in float64 without hooks: A = conv(x) (raw), y = fc(pool(relu(A)))[c]
    m64 = _Tiny().double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    A = m64.conv(x.double())
    logits = m64.fc(m64.pool(torch.relu(A)).flatten(1))
    c = int(logits[0].argmax())
    (G,) = torch.autograd.grad(logits[0, c], A)
    A_np, G_np = A.detach().numpy()[0], G.numpy()[0]
    assert (A_np < 0).any()  # the pre-ReLU activation really differs from the post-ReLU one
    alpha = G_np.mean(axis=(1, 2))
    expected_map = minmax(np.maximum(np.tensordot(alpha, A_np, axes=(0, 0)), 0.0))

    out = reference_cam(model, x, ["conv"], method="gradcam")
    assert out["targets"][0] == c
    np.testing.assert_allclose(out["logits"][0], logits.detach().numpy()[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["maps"][0][0], expected_map, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["scores"][0, 0], max(G_np.mean(), 0.0), rtol=0, atol=1e-15)
    # caller's model untouched
    assert model.conv.weight.dtype == torch.float32
    assert not model.conv._forward_hooks
