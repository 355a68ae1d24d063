"""Each CFG++ update against its formula written out on known tensors, and against exact solutions."""

from __future__ import annotations

import math

import pytest
import torch

from diffstack_cfgpp.updates import dpmpp_2m_cfgpp_step, euler_cfgpp_step, guided_noise, sample

X = torch.tensor([1.0, 2.0])
EPS_U = torch.tensor([0.5, -0.5])
EPS_C = torch.tensor([1.5, 0.5])


def test_euler_cfgpp_step_denoises_guided_and_renoises_unconditional() -> None:
    # ε_g = ε_u + 0.5(ε_c − ε_u) = [1, 0]; x0 = x − 2·ε_g = [−1, 2]; x_next = x0 + 1·ε_u
    stepped = euler_cfgpp_step(X, 2.0, 1.0, EPS_U, EPS_C, 0.5)
    assert torch.equal(stepped, torch.tensor([-0.5, 1.5]))
    ordinary_cfg = X + (1.0 - 2.0) * guided_noise(EPS_U, EPS_C, 0.5)  # Euler re-noising with ε_g
    assert not torch.allclose(stepped, ordinary_cfg)


def test_dpmpp_2m_cfgpp_first_step_is_euler_cfgpp_and_second_adds_the_correction() -> None:
    first, state = dpmpp_2m_cfgpp_step(X, 4.0, 2.0, EPS_U, EPS_C, 0.5, None)
    assert torch.allclose(first, euler_cfgpp_step(X, 4.0, 2.0, EPS_U, EPS_C, 0.5))
    assert torch.equal(state.x0_uncond, X - 4.0 * EPS_U)

    eps_u2, eps_c2 = torch.tensor([0.25, 0.0]), torch.tensor([0.75, 1.0])
    second, _ = dpmpp_2m_cfgpp_step(first, 2.0, 1.0, eps_u2, eps_c2, 0.5, state)
    x0_g = first - 2.0 * (eps_u2 + 0.5 * (eps_c2 - eps_u2))
    x0_u = first - 2.0 * eps_u2
    h = math.log(2.0 / 1.0)
    r = math.log(4.0 / 2.0) / h
    expected = x0_g + math.exp(-h) * (first - x0_u) - math.expm1(-h) / (2 * r) * (x0_g - state.x0_uncond)
    assert torch.allclose(second, expected)
    # h = h_prev here, so r = 1 and the correction is +¼(x0_g − x0_u_prev): a number checked by hand too
    assert torch.allclose(second, x0_g + 0.5 * (first - x0_u) + 0.25 * (x0_g - state.x0_uncond))


def test_the_step_to_sigma_zero_returns_the_guided_data_estimate() -> None:
    x0_g = X - 1.0 * guided_noise(EPS_U, EPS_C, 0.75)
    assert torch.equal(euler_cfgpp_step(X, 1.0, 0.0, EPS_U, EPS_C, 0.75), x0_g)
    assert torch.equal(dpmpp_2m_cfgpp_step(X, 1.0, 0.0, EPS_U, EPS_C, 0.75, None)[0], x0_g)


def _gaussian_eps(mean: float, std: float):  # type: ignore[no-untyped-def]
    """The exact ε-prediction for data N(mean, std²): ε = σ(x − mean)/(std² + σ²)."""
    return lambda x, sigma: sigma * (x - mean) / (std**2 + sigma**2)


def _sigmas(steps: int) -> list[float]:
    ramp = torch.linspace(0, 1, steps)
    sigmas = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7  # Karras, ρ = 7
    return [*sigmas.tolist(), 0.0]


def _ode_error(sampler: str, steps: int) -> float:
    """Largest distance from the exact answer for data N(3, 0.5²), both halves exact (λ is moot)."""
    eps = _gaussian_eps(mean=3.0, std=0.5)
    sigmas = _sigmas(steps)
    x_t = torch.linspace(-2, 2, 9, dtype=torch.float64) * sigmas[0]
    # The probability-flow ODE for Gaussian data: x(σ) = mean + √(std² + σ²)/√(std² + σ_T²)·(x_T − mean);
    # the last step (to σ = 0) returns the posterior mean at the last σ.
    at_last = 3.0 + math.sqrt(0.25 + sigmas[-2] ** 2) / math.sqrt(0.25 + sigmas[0] ** 2) * (x_t - 3.0)
    exact = 3.0 + 0.25 / (0.25 + sigmas[-2] ** 2) * (at_last - 3.0)

    def both(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        return eps(x, sigma), eps(x, sigma)

    return (sample(both, x_t, sigmas, 1.0, sampler) - exact).abs().max().item()


def test_euler_is_first_order_and_dpmpp_2m_second_order_on_the_exact_ode() -> None:
    assert _ode_error("euler_cfgpp", 32) / _ode_error("euler_cfgpp", 64) == pytest.approx(2.0, rel=0.1)
    assert _ode_error("dpmpp_2m_cfgpp", 32) / _ode_error("dpmpp_2m_cfgpp", 64) > 3.5
    assert _ode_error("dpmpp_2m_cfgpp", 8) < _ode_error("euler_cfgpp", 8) / 3


@pytest.mark.parametrize("sampler", ["euler_cfgpp", "dpmpp_2m_cfgpp"])
def test_the_scale_moves_the_result_from_unconditional_data_past_the_conditional_mean(sampler: str) -> None:
    eps_u, eps_c = _gaussian_eps(mean=-1.0, std=0.2), _gaussian_eps(mean=1.0, std=0.2)

    def both(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        return eps_u(x, sigma), eps_c(x, sigma)

    x_t = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 14.6
    means = [sample(both, x_t, _sigmas(12), scale, sampler).mean().item() for scale in (0.0, 0.5, 1.0)]
    assert means[0] == pytest.approx(-1.0, abs=0.05)
    # λ = 1 is not conditional sampling: re-noising with ε_u keeps pulling towards the conditional
    # side, like ordinary CFG with a scale above 1 (the paper's equivalence)
    assert means[0] < means[1] < means[2] and means[2] > 1.0


def test_out_of_range_scale_and_unknown_sampler_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        euler_cfgpp_step(X, 2.0, 1.0, EPS_U, EPS_C, 7.5)
    with pytest.raises(ValueError, match="unknown CFG\\+\\+ sampler"):
        sample(lambda x, s: (x, x), X, [1.0, 0.0], 0.5, "euler")
