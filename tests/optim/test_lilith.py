"""Lilith against updates worked out independently (docs/design.md#lilith), step by step."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from composer_remask.optim import Lilith
from tests.helpers.lilith_cases import lilith_rtol

EPS, B1, B2, BV, WD = 1e-8, 0.9, 0.99, 0.999, 0.01


def test_first_step_by_hand():
    # theta = [3, 4] (norm 5), g = [0.6, 0.8] (norm 1): trust ratio 5, so g' = [3, 4].
    theta = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    theta.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    Lilith([theta], lr=0.1).step()
    # m1 = 0.1 * g' = [0.3, 0.4]; m2 = 0.01 * (m1 - 0) = [0.003, 0.004]; u = m1 + m2 = [0.303, 0.404]
    # v = 0.001 u^2, v_hat = v / (1 - 0.999) = u^2; u / sqrt(u^2 + 1e-8); then + 0.01 theta.
    expected = [3.0 - 0.1 * (0.303 / math.sqrt(0.303**2 + 1e-8) + 0.03),
                4.0 - 0.1 * (0.404 / math.sqrt(0.404**2 + 1e-8) + 0.04)]
    assert theta.detach().tolist() == pytest.approx(expected, rel=lilith_rtol(1), abs=0)  # one step, two routes


def reference_lilith(theta, grads, lr, acceleration=1.0, bias_correction=True, skip_trust=False):
    """The update rule of docs/design.md#lilith written out with Python floats, one element list per tensor."""
    theta = list(theta)
    m1 = [0.0] * len(theta)
    m2 = [0.0] * len(theta)
    v = [0.0] * len(theta)
    history = []
    for t, grad in enumerate(grads, start=1):
        g = list(grad)
        if not skip_trust:
            p_norm = math.sqrt(sum(x * x for x in theta))
            g_norm = math.sqrt(sum(x * x for x in g))
            ratio = max(p_norm / max(g_norm, 1e-4), 1e-4)
            g = [ratio * x for x in g]
        for i in range(len(theta)):
            old = m1[i]
            m1[i] = B1 * (m1[i] + m2[i]) + (1 - B1) * g[i]
            m2[i] = B2 * m2[i] + (1 - B2) * (m1[i] - old)
            u = m1[i] + acceleration * m2[i]
            v[i] = BV * v[i] + (1 - BV) * u * u
            v_hat = v[i] / (1 - BV**t) if bias_correction else v[i]
            u = u / math.sqrt(v_hat + EPS)
            theta[i] = theta[i] - lr * (u + WD * theta[i])
        history.append(list(theta))
    return history


GRADS = [[0.5, -1.0, 0.25], [0.1, 0.3, -0.2], [-0.4, 0.2, 0.6], [0.05, -0.05, 0.0], [1.0, 1.0, -1.0]]


@pytest.mark.parametrize("acceleration,bias_correction", [(1.0, True), (0.5, True), (1.0, False)])
def test_several_steps_match_reference(acceleration, bias_correction):
    start = [0.2, -0.7, 1.1]
    theta = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = Lilith([theta], lr=0.05, acceleration=acceleration, bias_correction=bias_correction)
    expected = reference_lilith(start, GRADS, 0.05, acceleration, bias_correction)
    for grad, want in zip(GRADS, expected):
        theta.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        assert theta.detach().tolist() == pytest.approx(want, rel=lilith_rtol(len(GRADS)), abs=0)


@pytest.mark.parametrize("shape", [(), (1,)])
def test_trust_ratio_is_skipped_for_scalars(shape):
    # With a trust ratio, 1e3 * tiny gradients would be rescaled to the parameter's norm; without
    # it, the update follows the raw gradient. Compare with the reference with the ratio skipped.
    grads = [[1e-3], [-2e-3], [5e-4]]
    theta = torch.nn.Parameter(torch.full(shape, 4.0, dtype=torch.float64))
    optimizer = Lilith([theta], lr=0.1)
    expected = reference_lilith([4.0], grads, 0.1, skip_trust=True)
    for grad, want in zip(grads, expected):
        theta.grad = torch.tensor(grad[0], dtype=torch.float64).reshape(shape)
        optimizer.step()
        assert theta.detach().reshape(-1).tolist() == pytest.approx(want, rel=1e-10)
    assert expected != reference_lilith([4.0], grads, 0.1, skip_trust=False)


def test_weight_decay_alone_shrinks_by_lr_times_decay():
    # A zero gradient leaves u = 0, so only decay acts: theta <- theta (1 - lr * wd).
    theta = torch.nn.Parameter(torch.tensor([2.0, -3.0], dtype=torch.float64))
    theta.grad = torch.zeros(2, dtype=torch.float64)
    Lilith([theta], lr=0.5, weight_decay=0.2).step()
    assert theta.detach().tolist() == pytest.approx([2.0 * 0.9, -3.0 * 0.9])


def test_param_groups_have_no_momentum_and_lr_is_read_each_step():
    theta = torch.nn.Parameter(torch.ones(4))
    optimizer = Lilith([theta], lr=1.0)
    assert not {"momentum", "betas"} & set(optimizer.param_groups[0])
    optimizer.param_groups[0]["lr"] = 0.0
    theta.grad = torch.ones(4)
    optimizer.step()
    assert torch.equal(theta.detach(), torch.ones(4))


def test_resuming_from_state_dict_continues_the_same_trajectory():
    torch.manual_seed(0)
    x = torch.randn(5, 3)

    def step(model, opt):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()

    original = torch.nn.Linear(3, 2)
    opt = Lilith(original.parameters(), lr=0.01)
    for _ in range(2):
        step(original, opt)
    resumed, fresh = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    resumed.load_state_dict(original.state_dict())
    fresh.load_state_dict(original.state_dict())
    resumed_opt, fresh_opt = Lilith(resumed.parameters(), lr=0.01), Lilith(fresh.parameters(), lr=0.01)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        step(original, opt)
        step(resumed, resumed_opt)
        step(fresh, fresh_opt)
    torch.testing.assert_close(resumed.weight, original.weight)
    assert not torch.allclose(fresh.weight, original.weight)


def test_ema_copies_the_average_every_k_steps():
    start = torch.tensor([1.0, 2.0], dtype=torch.float64)
    grads = [torch.tensor([0.3, -0.1], dtype=torch.float64), torch.tensor([-0.2, 0.4], dtype=torch.float64)]
    plain = torch.nn.Parameter(start.clone())
    plain_opt = Lilith([plain], lr=0.1)
    plain_after = []
    for grad in grads:
        plain.grad = grad.clone()
        plain_opt.step()
        plain_after.append(plain.detach().clone())

    theta = torch.nn.Parameter(start.clone())
    optimizer = Lilith([theta], lr=0.1, ema_k=2, ema_beta=0.5)
    theta.grad = grads[0].clone()
    optimizer.step()  # step 1: a plain update, the average follows: ema = start + 0.5 (theta - start)
    assert torch.equal(theta.detach(), plain_after[0])
    ema = start + 0.5 * (plain_after[0] - start)
    theta.grad = grads[1].clone()
    optimizer.step()  # step 2: plain update, ema <- ema + 0.5 (theta - ema), then theta <- ema
    # Both sides: two average updates of 3 float64 roundings each from the same values (12 in all).
    torch.testing.assert_close(theta.detach(), ema + 0.5 * (plain_after[1] - ema), rtol=12 * torch.finfo(torch.float64).eps,
                               atol=0)
