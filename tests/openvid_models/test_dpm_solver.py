"""DPM-Solver++ (openvid_models.dpm_solver): the discrete VP schedule against float64 formulas, the model calls,
and sampling Gaussian data with the exact eps, where the diffusion ODE's solution is known in closed form."""

import math

import numpy as np
import pytest
import torch

from openvid_models import DPMSolverSampler
from openvid_models.diffusion import get_named_beta_schedule
from openvid_models.dpm_solver import DiscreteVPSchedule
from tests.openvid_models.test_diffusion import ALPHAS_CUMPROD, PROMPTS, FakeTextEncoder, GaussianDataDiT

SCALE = 2.5


def guided_means(model, prompts, scale=SCALE, guided_channels=2):
    """``[n, C, 1, 1, 1]``: the data mean that eps guided at ``scale`` is exact for (Gaussians of one std)."""
    null = model.y_embedder.y_embedding[0].double()
    means = torch.tensor([PROMPTS[p] for p in prompts], dtype=torch.float64)
    guided = null + scale * (means - null)
    guided[:, guided_channels:] = means[:, guided_channels:]
    return guided.view(len(prompts), -1, 1, 1, 1)


def exact_ode_solution(z, mean, std):
    """The probability-flow ODE maps x_1 = z to x at t = 1/N keeping (x - alpha mean) / sqrt(alpha^2 std^2 +
    sigma^2) fixed: the marginals are Gaussian all the way."""
    ac_end, ac_start = ALPHAS_CUMPROD[0], ALPHAS_CUMPROD[-1]
    standardized = (z.double() - math.sqrt(ac_start) * mean) / math.sqrt(ac_start * std**2 + 1 - ac_start)
    return math.sqrt(ac_end) * mean + math.sqrt(ac_end * std**2 + 1 - ac_end) * standardized


def run(sampler, model=None, prompts=tuple(PROMPTS), z_size=(2, 4, 16, 16), seed=0, **kwargs):
    model = model if model is not None else GaussianDataDiT()
    out = sampler.sample(model, FakeTextEncoder(PROMPTS), z_size, list(prompts), "cpu",
                         generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)
    z = torch.randn((len(prompts), *z_size), generator=torch.Generator().manual_seed(seed))  # the sampler's draw
    return out, z, model


def max_error(**kwargs):
    out, z, model = run(DPMSolverSampler(cfg_scale=SCALE, **kwargs))
    return (out.double() - exact_ode_solution(z, guided_means(model, PROMPTS), model.std)).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------

def test_discrete_schedule_interpolates_log_alpha_of_the_training_steps():
    schedule = DiscreteVPSchedule(get_named_beta_schedule("linear", 1000))
    assert schedule.total_N == 1000
    t = np.arange(1, 1001) / 1000
    log_alpha = 0.5 * np.log(ALPHAS_CUMPROD)
    np.testing.assert_allclose(schedule.log_alpha(t), log_alpha, rtol=1e-12)
    np.testing.assert_allclose(schedule.log_alpha(t[:-1] + 0.25e-3), 0.75 * log_alpha[:-1] + 0.25 * log_alpha[1:],
                               rtol=1e-12)
    np.testing.assert_allclose(schedule.sigma(t), np.sqrt(1 - ALPHAS_CUMPROD), rtol=1e-12)
    np.testing.assert_allclose(schedule.lambda_(t), 0.5 * np.log(ALPHAS_CUMPROD / (1 - ALPHAS_CUMPROD)), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(schedule.model_time(t), np.arange(1000), atol=1e-9)  # 1000 t - 1
    probe = np.random.default_rng(0).uniform(1e-3, 1.0, 50)
    np.testing.assert_allclose(schedule.inverse_lambda(schedule.lambda_(probe)), probe, rtol=1e-9)


def test_cosine_schedule_drops_the_steps_below_the_logsnr_floor():
    betas = get_named_beta_schedule("squaredcos_cap_v2", 1000)
    ac = np.cumprod(1 - betas)
    expected = int(np.sum(0.5 * np.log(ac / (1 - ac)) >= -5.1))
    assert 900 < expected < 1000 and DiscreteVPSchedule(betas).total_N == expected


@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR", "time_quadratic"])
def test_time_steps(skip_type):
    sampler = DPMSolverSampler(num_sampling_steps=20, skip_type=skip_type)
    ts = sampler.time_steps()
    assert ts.shape == (21,) and ts[0] == pytest.approx(1.0) and ts[-1] == pytest.approx(1e-3)
    if skip_type == "time_uniform":
        np.testing.assert_allclose(ts, np.linspace(1, 1e-3, 21), rtol=1e-12)
    elif skip_type == "logSNR":
        log_alpha = np.interp(ts, np.arange(1, 1001) / 1000, 0.5 * np.log(ALPHAS_CUMPROD))
        lam = log_alpha - 0.5 * np.log(1 - np.exp(2 * log_alpha))
        np.testing.assert_allclose(np.diff(lam), np.full(20, (lam[-1] - lam[0]) / 20), rtol=1e-6)
    else:
        np.testing.assert_allclose(np.sqrt(ts), np.linspace(1, math.sqrt(1e-3), 21), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Model calls
# ---------------------------------------------------------------------------------------------------------

def test_each_step_is_one_guided_forward_at_the_discrete_timestep():
    sampler = DPMSolverSampler(num_sampling_steps=6)
    out, _, model = run(sampler, z_size=(2, 1, 4, 4))
    assert out.shape == (2, 2, 1, 4, 4) and out.dtype == torch.float32
    assert len(model.calls) == 6  # no evaluation after the last step
    expected = 1000 * sampler.time_steps()[:-1] - 1  # 999, 832.5, ...
    for call, timestep in zip(model.calls, expected):
        assert call["timestep"].dtype == torch.float32 and call["timestep"].shape == (4,)
        np.testing.assert_allclose(call["timestep"].numpy(), timestep, rtol=1e-6)
        assert torch.equal(call["x"][:2], call["x"][2:])
        assert torch.equal(call["y"][2:, 0], model.y_embedder.y_embedding.expand(2, -1, -1))  # [cond; null]
        assert torch.equal(call["y"][:2, 0, 0], torch.tensor(list(PROMPTS.values())).float())
        assert call["mask"].shape == (2, 4)


def test_variance_channels_are_dropped_and_cfg_channel_limits_guidance():
    out, _, _ = run(DPMSolverSampler(cfg_scale=SCALE), model=GaussianDataDiT(variance_nan=True))
    assert torch.isfinite(out).all()
    # Guidance on channel 0 only: channel 1 follows the conditional model's mean.
    out, z, model = run(DPMSolverSampler(num_sampling_steps=25, skip_type="logSNR", cfg_scale=SCALE, cfg_channel=1))
    expected = exact_ode_solution(z, guided_means(model, PROMPTS, guided_channels=1), model.std)
    assert (out.double() - expected).abs().max() < 0.05
    assert (out.double() - exact_ode_solution(z, guided_means(model, PROMPTS), model.std)).abs().max() > 1


def test_model_dtype_and_determinism():
    sampler = DPMSolverSampler(num_sampling_steps=5)
    first, _, _ = run(sampler, seed=1)
    assert torch.equal(first, run(sampler, seed=1)[0]) and not torch.equal(first, run(sampler, seed=2)[0])
    in_double, _, model = run(sampler, seed=1, dtype=torch.float64)
    assert model.calls[0]["x"].dtype == torch.float64 and model.calls[0]["y"].dtype == torch.float64
    assert in_double.dtype == torch.float32
    torch.testing.assert_close(in_double, first, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Accuracy on Gaussian data
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [20, 25])
def test_samples_have_the_guided_data_distribution(steps):
    z_size = (2, 8, 32, 32)
    out, _, model = run(DPMSolverSampler(num_sampling_steps=steps, skip_type="logSNR", cfg_scale=SCALE),
                        z_size=z_size)
    mean = guided_means(model, PROMPTS).view(2, 2)
    count = math.prod(z_size[1:])
    # x at t = 1/N: alpha_0 mean + N(0, alpha_0^2 std^2 + sigma_0^2), alpha_0^2 = 1 - 1e-4
    end_mean = math.sqrt(ALPHAS_CUMPROD[0]) * mean
    end_std = math.sqrt(ALPHAS_CUMPROD[0] * model.std**2 + 1 - ALPHAS_CUMPROD[0])
    values = out.double().flatten(2)
    # Sampling error (5 standard errors) plus the solver's: a bias of a few per mille of the mean, ~1 % on std.
    assert ((values.mean(-1) - end_mean).abs() < 5 * end_std / math.sqrt(count) + 0.01 * end_mean.abs()).all()
    assert ((values.std(-1) / end_std - 1).abs() < 5 / math.sqrt(2 * count) + 0.02).all()


def test_error_falls_with_the_square_of_the_step_size():
    errors = {order: [max_error(num_sampling_steps=n, skip_type="logSNR", order=order) for n in (20, 40, 80)]
              for order in (1, 2)}
    second, first = errors[2], errors[1]
    assert second[0] < 0.05 and second[0] / second[1] > 3.2 and second[1] / second[2] > 3.2  # ~3.7, ~3.9
    assert 1.7 < first[0] / first[1] < 2.3 and 1.7 < first[1] / first[2] < 2.3  # DDIM: first order
    assert second[2] < first[2] / 20


def test_velocity_prediction_samples_as_the_equivalent_eps_prediction():
    eps_out, _, _ = run(DPMSolverSampler(cfg_scale=SCALE))
    v_out, _, _ = run(DPMSolverSampler(cfg_scale=SCALE, prediction="v"), model=GaussianDataDiT(prediction="v"))
    torch.testing.assert_close(v_out, eps_out, rtol=1e-4, atol=1e-4)  # float32 outputs, converted differently


def test_lower_order_final_follows_upstreams_rule_by_default():
    # Below 10 steps the last step is first order; at 20 (Open-Sora's setting) it is second order unless asked.
    assert max_error(num_sampling_steps=8) == max_error(num_sampling_steps=8, lower_order_final=True)
    upstream = max_error(num_sampling_steps=20)
    assert upstream == max_error(num_sampling_steps=20, lower_order_final=False)
    assert max_error(num_sampling_steps=20, lower_order_final=True) < upstream / 2  # a long last log-SNR step


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(order=3), "order must be 1 or 2"),
    (dict(num_sampling_steps=1), "num_sampling_steps must be an int >= order"),
    (dict(skip_type="uniform"), "skip_type must be one of"),
    (dict(noise_schedule="cosine"), "noise_schedule must be one of"),
    (dict(cfg_channel=-1), "cfg_channel"),
    (dict(prediction="x0"), "prediction must be one of"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverSampler(**kwargs)


def test_sample_errors():
    sampler = DPMSolverSampler(num_sampling_steps=3)
    with pytest.raises(ValueError, match=r"z_size must be the latent's \[C, T, H, W\]"):
        run(sampler, z_size=(2, 4, 4, 4, 1))
    with pytest.raises(ValueError, match="cfg_channel must be in"):
        run(DPMSolverSampler(num_sampling_steps=3, cfg_channel=5), z_size=(2, 1, 4, 4))

    class ThreeChannels(GaussianDataDiT):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)[:, :3]

    with pytest.raises(ValueError, match="must return 2 or 4 channels"):
        run(sampler, model=ThreeChannels(), z_size=(2, 1, 4, 4))


def test_dpm_solver_samples_with_the_tiny_stdit():
    from openvid_models import STDiT
    from tests.openvid_models.test_diffusion import RandomCaptions
    from tests.openvid_models.utils import tiny_model

    model, z_size = tiny_model(STDiT), (4, 3, 6, 10)
    out = DPMSolverSampler(num_sampling_steps=3).sample(model, RandomCaptions(), z_size, ["a", "b"], "cpu",
                                                        generator=torch.Generator().manual_seed(0), progress=False)
    assert out.shape == (2, *z_size) and out.dtype == torch.float32 and torch.isfinite(out).all()
