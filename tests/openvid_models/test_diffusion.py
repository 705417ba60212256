"""IDDPM (openvid_models.diffusion) against the improved-diffusion formulas restated here in float64 numpy, and
its guided sampling loop on a model that knows the exact eps of Gaussian data."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from openvid_models import IDDPM, forward_with_cfg
from openvid_models.diffusion import space_timesteps

# The released schedule, restated: 1000 linear betas 1e-4 .. 0.02.
BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)


# ---------------------------------------------------------------------------------------------------------
# Fakes: a DiT whose eps is exact for Gaussian data, a text encoder
# ---------------------------------------------------------------------------------------------------------

class GaussianDataDiT(nn.Module):
    """``model(x, timestep, y, mask) -> [B, 2C, ...]``: the exact eps for data ~ N(mean, std^2) per channel,
    ``mean = y[:, 0, 0, :C]`` (so the caption picks the data mean), and the variance channels set to
    ``y[:, 0, 1, 0]``. Float timesteps interpolate log(alpha) linearly between the integer steps (DPM-Solver's
    discrete schedule). The null caption is a buffer ``y_embedder.y_embedding [L, C]``. ``prediction="v"``:
    the velocity ``alpha eps - sigma x_0 = (eps - sigma x) / alpha`` instead of eps."""

    def __init__(self, channels=2, caption_len=4, std=0.5, null_means=(0.0, -1.0), null_variance=-0.6,
                 variance_nan=False, prediction="eps"):
        super().__init__()
        self.in_channels, self.std, self.variance_nan = channels, std, variance_nan
        self.prediction = prediction
        self.y_embedder = nn.Module()
        null = torch.zeros(caption_len, channels)
        null[0] = torch.tensor(null_means)
        null[1, 0] = null_variance
        self.y_embedder.register_buffer("y_embedding", null)
        self.register_buffer("log_alpha", torch.from_numpy(0.5 * np.log(ALPHAS_CUMPROD)))
        self.calls = []

    def forward(self, x, timestep, y, mask=None):
        self.calls.append(dict(x=x.clone(), timestep=timestep.clone(), y=y.clone(), mask=mask))
        assert x.shape[0] == y.shape[0] == timestep.shape[0] and mask.shape[0] * 2 == y.shape[0]
        t = timestep.double()
        low = t.floor().long().clamp(0, len(self.log_alpha) - 2)
        log_alpha = torch.lerp(self.log_alpha[low], self.log_alpha[low + 1], t - low)
        alpha = log_alpha.exp().view(-1, 1, 1, 1, 1)
        sigma = (1 - alpha**2).sqrt()
        mean = y[:, 0, 0, : self.in_channels].double().view(*y.shape[:1], -1, 1, 1, 1)
        eps = sigma * (x.double() - alpha * mean) / (alpha**2 * self.std**2 + sigma**2)
        if self.prediction == "v":
            eps = (eps - sigma * x.double()) / alpha
        variance = y[:, 0, 1, 0].double().view(-1, 1, 1, 1, 1).expand_as(eps)
        if self.variance_nan:
            variance = torch.full_like(eps, float("nan"))
        return torch.cat([eps, variance], dim=1).float()


class FakeTextEncoder:
    """``encode(prompts) -> {"y": [n, 1, L, C], "mask": [n, L]}`` with each prompt's data means in y[:, 0, 0]
    and its variance-channel value in y[:, 0, 1, 0]."""

    def __init__(self, means, variance=0.5, caption_len=4):
        self.means, self.variance, self.caption_len = means, variance, caption_len

    def encode(self, prompts):
        channels = len(next(iter(self.means.values())))
        y = torch.zeros(len(prompts), 1, self.caption_len, channels)
        for i, prompt in enumerate(prompts):
            y[i, 0, 0] = torch.tensor(self.means[prompt])
            y[i, 0, 1, 0] = self.variance
        mask = (torch.arange(self.caption_len)[None] < torch.arange(2, 2 + len(prompts))[:, None]).long()
        return {"y": y, "mask": mask}


PROMPTS = {"a red ball": (3.0, 0.5), "a blue sky": (-2.0, 1.5)}


# ---------------------------------------------------------------------------------------------------------
# Reference formulas (float64)
# ---------------------------------------------------------------------------------------------------------

def reference_tables(alphas_cumprod):
    """improved-diffusion's tables for a chain with these alphas_cumprod."""
    ac_prev = np.append(1.0, alphas_cumprod[:-1])
    betas = 1.0 - alphas_cumprod / ac_prev
    post_var = betas * (1.0 - ac_prev) / (1.0 - alphas_cumprod)
    return dict(betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=ac_prev,
                sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
                sqrt_recip_alphas_cumprod=1.0 / np.sqrt(alphas_cumprod),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
                posterior_variance=post_var,
                posterior_log_variance_clipped=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
                posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - alphas_cumprod),
                posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))


def reference_p_mean_variance(tables, x, t, model_eps, model_v):
    """Mean, variance, log-variance and x_0 of p(x_{t-1} | x_t) for eps and learned-range v (numpy)."""
    b = lambda name: tables[name][t].reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
    pred_x0 = b("sqrt_recip_alphas_cumprod") * x - b("sqrt_recipm1_alphas_cumprod") * model_eps
    mean = b("posterior_mean_coef1") * pred_x0 + b("posterior_mean_coef2") * x
    frac = (model_v + 1) / 2
    log_var = frac * np.log(b("betas")) + (1 - frac) * b("posterior_log_variance_clipped")
    return mean, np.exp(log_var), log_var, pred_x0


def reference_discretized_log_likelihood(x, mean, log_scale):
    cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # noqa: E731
    inv_std = np.exp(-log_scale)
    plus, minus = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    middle = np.log(np.maximum(plus - minus, 1e-12))
    return np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)), middle))


class AffineModel(nn.Module):
    """eps = a x + 1e-3 t, v = tanh(c x): outputs that depend on x, t and two parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.9, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.timesteps = []

    def forward(self, x, timestep, **kwargs):
        self.timesteps.append(timestep.clone())
        t = timestep.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return torch.cat([self.a * x + 1e-3 * t, torch.tanh(self.c * x)], dim=1)


def affine_reference(x, timestep):
    t = np.asarray(timestep, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.9 * x + 1e-3 * t, np.tanh(0.7 * x)


def rng_inputs(shape=(4, 2, 3, 4, 4), seed=0):
    g = np.random.default_rng(seed)
    x = g.uniform(-1, 1, shape)
    x[0, 0, 0, 0, :2] = [-1.0, 1.0]  # the edge bins of the decoder likelihood
    return x, g.standard_normal(shape)


# ---------------------------------------------------------------------------------------------------------
# Schedule, q, p
# ---------------------------------------------------------------------------------------------------------

def test_schedule_tables_match_improved_diffusion():
    diffusion = IDDPM()
    assert diffusion.num_timesteps == 1000 and diffusion.timestep_map == list(range(1000))
    for name, expected in reference_tables(ALPHAS_CUMPROD).items():
        table = getattr(diffusion, name)
        assert table.dtype == np.float64, name
        np.testing.assert_allclose(table, expected, rtol=1e-12, atol=0, err_msg=name)
    np.testing.assert_allclose(diffusion.betas[[0, 999]], [1e-4, 0.02], rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod_next, np.append(ALPHAS_CUMPROD[1:], 0.0), rtol=1e-12)


def test_cosine_schedule_and_scaled_linear_schedule():
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = [min(1 - alpha_bar((i + 1) / 50) / alpha_bar(i / 50), 0.999) for i in range(50)]
    np.testing.assert_allclose(IDDPM(noise_schedule="squaredcos_cap_v2", diffusion_steps=50).betas, expected,
                               rtol=1e-12)
    np.testing.assert_allclose(IDDPM(diffusion_steps=500).betas, np.linspace(2e-4, 0.04, 500), rtol=1e-12)


def test_q_sample_and_posterior():
    diffusion = IDDPM()
    x, noise = rng_inputs()
    t = np.array([0, 1, 500, 999])
    x_t = diffusion.q_sample(torch.from_numpy(x), torch.from_numpy(t), noise=torch.from_numpy(noise))
    ac = ALPHAS_CUMPROD[t].reshape(-1, 1, 1, 1, 1)
    np.testing.assert_allclose(x_t.numpy(), np.sqrt(ac) * x + np.sqrt(1 - ac) * noise, rtol=1e-12, atol=1e-14)
    assert diffusion.q_sample(torch.from_numpy(x).float(), torch.from_numpy(t)).dtype == torch.float32

    mean, var, log_var = diffusion.q_posterior_mean_variance(torch.from_numpy(x), x_t, torch.from_numpy(t))
    ref = reference_tables(ALPHAS_CUMPROD)
    coef = lambda name: ref[name][t].reshape(-1, 1, 1, 1, 1)  # noqa: E731
    np.testing.assert_allclose(mean.numpy(), coef("posterior_mean_coef1") * x + coef("posterior_mean_coef2")
                               * x_t.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(coef("posterior_variance"), x.shape), rtol=1e-12)
    np.testing.assert_allclose(log_var.numpy()[:, 0, 0, 0, 0], ref["posterior_log_variance_clipped"][t], rtol=1e-12)


@pytest.mark.parametrize("respacing", [None, "10"])
def test_p_mean_variance_with_learned_range_sigma(respacing):
    diffusion = IDDPM(timestep_respacing=respacing)
    kept = np.arange(1000) if respacing is None else np.array([0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
    x, _ = rng_inputs(seed=1)
    x *= 3
    t = np.array([0, 1, 5, 9])
    model = AffineModel()
    out = diffusion.p_mean_variance(model, torch.from_numpy(x), torch.from_numpy(t), clip_denoised=False)
    assert model.timesteps[0].tolist() == kept[t].tolist()  # the model sees the original timesteps
    eps, v = affine_reference(x, kept[t])
    expected = reference_p_mean_variance(reference_tables(ALPHAS_CUMPROD[kept]), x, t, eps, v)
    for key, value in zip(["mean", "variance", "log_variance", "pred_xstart"], expected):
        np.testing.assert_allclose(out[key].detach().numpy(), value, rtol=1e-10, atol=1e-12, err_msg=key)
    clipped = diffusion.p_mean_variance(model, torch.from_numpy(x), torch.from_numpy(t))["pred_xstart"]
    np.testing.assert_allclose(clipped.detach().numpy(), np.clip(expected[3], -1, 1), rtol=1e-10)


@pytest.mark.parametrize("sigma_small", [False, True])
def test_p_mean_variance_with_fixed_variance(sigma_small):
    diffusion = IDDPM(learn_sigma=False, sigma_small=sigma_small)
    x, _ = rng_inputs(seed=2)
    t = np.array([0, 1, 500, 999])
    out = diffusion.p_mean_variance(lambda x, t: 0.5 * x, torch.from_numpy(x), torch.from_numpy(t))
    ref = reference_tables(ALPHAS_CUMPROD)
    post = ref["posterior_variance"]
    expected = post if sigma_small else np.append(post[1], BETAS[1:])
    np.testing.assert_allclose(out["variance"].numpy()[:, 0, 0, 0, 0], expected[t], rtol=1e-12)
    np.testing.assert_allclose(out["log_variance"].numpy()[:, 0, 0, 0, 0], np.log(expected[t]) if not sigma_small
                               else ref["posterior_log_variance_clipped"][t], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------------------------------

def test_training_losses_mse_and_vb_in_bits():
    diffusion = IDDPM()
    x, noise = rng_inputs(seed=3)
    t = np.array([0, 1, 500, 999])
    model = AffineModel()
    terms = diffusion.training_losses(model, torch.from_numpy(x), torch.from_numpy(t), noise=torch.from_numpy(noise))
    assert set(terms) == {"loss", "mse", "vb"}

    ref = reference_tables(ALPHAS_CUMPROD)
    ac = ALPHAS_CUMPROD[t].reshape(-1, 1, 1, 1, 1)
    x_t = np.sqrt(ac) * x + np.sqrt(1 - ac) * noise
    eps, v = affine_reference(x_t, t)
    mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3, 4))
    mean, _, log_var, _ = reference_p_mean_variance(ref, x_t, t, eps, v)
    c = lambda name: ref[name][t].reshape(-1, 1, 1, 1, 1)  # noqa: E731
    true_mean = c("posterior_mean_coef1") * x + c("posterior_mean_coef2") * x_t
    true_log_var = c("posterior_log_variance_clipped")
    kl = 0.5 * (-1 + log_var - true_log_var + np.exp(true_log_var - log_var)
                + (true_mean - mean) ** 2 * np.exp(-log_var))
    nll = -reference_discretized_log_likelihood(x, mean, 0.5 * log_var)
    vb = np.where(t == 0, nll.mean(axis=(1, 2, 3, 4)), kl.mean(axis=(1, 2, 3, 4))) / np.log(2)

    np.testing.assert_allclose(terms["mse"].detach().numpy(), mse, rtol=1e-10)
    np.testing.assert_allclose(terms["vb"].detach().numpy(), vb, rtol=1e-8)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), mse + vb, rtol=1e-8)
    assert vb[0] > 0 and abs(vb[0] - kl[0].mean() / np.log(2)) > 1e-3  # t = 0 is the decoder NLL, not the KL


def test_vb_trains_the_variance_only_and_mse_the_eps_only():
    diffusion = IDDPM()
    x, noise = rng_inputs(seed=4)
    t = torch.tensor([0, 3, 400, 998])
    model = AffineModel()
    diffusion.training_losses(model, torch.from_numpy(x), t, noise=torch.from_numpy(noise))["vb"].sum().backward()
    assert model.a.grad == 0 and model.c.grad != 0
    model.zero_grad()
    diffusion.training_losses(model, torch.from_numpy(x), t, noise=torch.from_numpy(noise))["mse"].sum().backward()
    assert model.a.grad != 0 and model.c.grad == 0


def test_velocity_prediction_target_and_clean_sample():
    # The v target is sqrt(ab) noise - sqrt(1 - ab) x_0, and from that v the chain recovers x_0 exactly.
    x, noise = (torch.from_numpy(a) for a in rng_inputs(seed=5))
    t = torch.tensor([0, 10, 500, 999])
    ac = torch.from_numpy(ALPHAS_CUMPROD)[t].view(-1, 1, 1, 1, 1)
    v = ac.sqrt() * noise - (1 - ac).sqrt() * x

    class Oracle(nn.Module):
        def forward(self, x_t, timestep):
            return torch.cat([v, torch.zeros_like(v)], dim=1)

    diffusion = IDDPM(predict_v=True)
    assert diffusion.training_losses(Oracle(), x, t, noise=noise)["mse"].abs().max() < 1e-24
    x_t = diffusion.q_sample(x, t, noise=noise)
    out = diffusion.p_mean_variance(Oracle(), x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x, rtol=1e-12, atol=1e-12)
    eps_out = IDDPM().p_mean_variance(lambda x_t, timestep: torch.cat([noise, torch.zeros_like(v)], dim=1), x_t, t,
                                      clip_denoised=False)
    torch.testing.assert_close(out["mean"], eps_out["mean"], rtol=1e-10, atol=1e-10)


def test_velocity_prediction_samples_as_the_equivalent_eps_prediction():
    encoder, generator = FakeTextEncoder(PROMPTS), lambda: torch.Generator().manual_seed(4)
    eps_out = IDDPM(timestep_respacing="20", cfg_scale=2.5).sample(
        GaussianDataDiT(), encoder, (2, 2, 4, 4), list(PROMPTS), "cpu", generator=generator(), progress=False)
    v_out = IDDPM(timestep_respacing="20", cfg_scale=2.5, predict_v=True).sample(
        GaussianDataDiT(prediction="v"), encoder, (2, 2, 4, 4), list(PROMPTS), "cpu", generator=generator(),
        progress=False)
    torch.testing.assert_close(v_out, eps_out, rtol=1e-4, atol=1e-4)  # float32 outputs, converted differently


def test_rescaled_and_kl_loss_types():
    x, noise = rng_inputs(seed=5)
    t = torch.tensor([0, 3, 400, 499])
    args = (AffineModel(), torch.from_numpy(x), t)
    noise = torch.from_numpy(noise)
    plain = IDDPM(diffusion_steps=500).training_losses(*args, noise=noise)
    rescaled = IDDPM(rescale_learned_sigmas=True, diffusion_steps=500).training_losses(*args, noise=noise)
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.5)  # x num_timesteps / 1000
    torch.testing.assert_close(rescaled["loss"], plain["mse"] + plain["vb"] * 0.5)
    kl = IDDPM(use_kl=True).training_losses(*args, noise=noise)
    assert set(kl) == {"loss"}
    expected = IDDPM().training_losses(*args, noise=noise)["vb"] * 1000
    torch.testing.assert_close(kl["loss"], expected)


# ---------------------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------------------

def test_space_timesteps():
    assert sorted(space_timesteps(1000, "10")) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    kept = sorted(space_timesteps(1000, "100"))
    assert kept == [int(np.round(k * 999 / 99)) for k in range(100)]  # no ties: 999 / 99 = 111 / 11
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    for start, count in [(0, 10), (100, 15), (200, 20)]:
        part = [s for s in sections if start <= s < start + 100]
        assert len(part) == count and part[0] == start and part[-1] == start + 99
    assert space_timesteps(1000, [1000]) == set(range(1000))


def test_respaced_chain_keeps_the_marginals_and_feeds_original_timesteps():
    diffusion = IDDPM(num_sampling_steps=100)
    kept = sorted(space_timesteps(1000, "100"))
    assert diffusion.num_timesteps == 100 and diffusion.timestep_map == kept
    assert IDDPM(timestep_respacing="100").timestep_map == kept
    ac_prev = np.append(1.0, ALPHAS_CUMPROD[kept][:-1])
    np.testing.assert_allclose(diffusion.betas, 1 - ALPHAS_CUMPROD[kept] / ac_prev, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod, ALPHAS_CUMPROD[kept], rtol=1e-12)
    model = AffineModel()
    x = torch.zeros(3, 2, 1, 2, 2, dtype=torch.float64)
    diffusion.training_losses(model, x, torch.tensor([0, 50, 99]))
    assert model.timesteps[0].tolist() == [kept[0], kept[50], kept[99]] and model.timesteps[0].dtype == torch.long


@pytest.mark.parametrize("kwargs,match", [
    (dict(timestep_respacing="fast"), "timestep_respacing must be"),
    (dict(timestep_respacing="ddim600"), "no integer stride"),
    (dict(timestep_respacing="2000"), "cannot take 2000 steps"),
    (dict(timestep_respacing="0"), "positive"),
    (dict(num_sampling_steps=100, timestep_respacing="100"), "not both"),
    (dict(num_sampling_steps=0), "num_sampling_steps"),
    (dict(num_sampling_steps=1), "at least 2 of the timesteps"),
    (dict(noise_schedule="cosine"), "noise_schedule must be one of"),
    (dict(diffusion_steps=0), "diffusion_steps"),
    (dict(cfg_channel=0), "cfg_channel"),
    (dict(predict_xstart=True, predict_v=True), "predict_xstart or predict_v, not both"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IDDPM(**kwargs)


def test_call_errors():
    diffusion = IDDPM()
    x = torch.zeros(2, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="integer tensor"):
        diffusion.q_sample(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\)"):
        diffusion.q_sample(x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="must return"):
        diffusion.p_mean_variance(lambda x, t: x, x, torch.tensor([1, 2]))  # no variance channels


# ---------------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------------

def test_forward_with_cfg_guides_the_first_channels_and_passes_the_rest():
    seen = {}

    def model(x, timestep, y, mask=None):
        seen.update(x=x, y=y, mask=mask)
        return torch.cat([x * y.view(-1, 1, 1), x + 10], dim=1)  # [2n, 2C, 3]: cond and null rows differ

    x = torch.randn(4, 2, 3)
    y = torch.tensor([2.0, 3.0, -1.0, 0.5])  # [cond; null]
    out = forward_with_cfg(model, x, torch.zeros(4), y, cfg_scale=7.0, mask="m")
    half = x[:2]
    assert torch.equal(seen["x"], torch.cat([half, half])) and seen["mask"] == "m"
    cond, uncond = half * y[:2].view(-1, 1, 1), half * y[2:].view(-1, 1, 1)
    guided = uncond + 7.0 * (cond - uncond)
    torch.testing.assert_close(out[:, :2], torch.cat([guided, guided]))
    torch.testing.assert_close(out[:, 2:], torch.cat([half, half]) + 10)  # unguided, per half

    partial = forward_with_cfg(model, x, torch.zeros(4), y, cfg_scale=7.0, cfg_channel=1)
    torch.testing.assert_close(partial[:, :1], torch.cat([guided, guided])[:, :1])
    torch.testing.assert_close(partial[:, 1:2], torch.cat([cond, uncond])[:, 1:2])
    as_dict = forward_with_cfg(lambda x, t, y: {"x": model(x, t, y)}, x, torch.zeros(4), y, cfg_scale=7.0)
    torch.testing.assert_close(as_dict, out)
    with pytest.raises(ValueError, match="cfg_channel must be in"):
        forward_with_cfg(model, x, torch.zeros(4), y, cfg_scale=7.0, cfg_channel=5)
    with pytest.raises(ValueError, match="even batch"):
        forward_with_cfg(model, x[:3], torch.zeros(3), y[:3], cfg_scale=7.0)


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------

def exact_chain_moments(kept, data_mean, std, variance_value):
    """Mean and variance of the ancestral chain's output from x_T ~ N(0, 1) when eps is exact for
    N(data_mean, std^2): every step is affine in x plus Gaussian noise."""
    ac = ALPHAS_CUMPROD[kept]
    ac_prev = np.append(1.0, ac[:-1])
    betas = 1 - ac / ac_prev
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log = np.log(np.append(post_var[1], post_var[1:]))
    mean, var = 0.0, 1.0
    for k in range(len(kept) - 1, -1, -1):
        alpha, sigma = np.sqrt(ac[k]), np.sqrt(1 - ac[k])
        den = ac[k] * std**2 + sigma**2
        eps_gain, eps_offset = sigma / den, -sigma * alpha * data_mean / den
        x0_gain, x0_offset = (1 - sigma * eps_gain) / alpha, -sigma * eps_offset / alpha
        c1 = betas[k] * np.sqrt(ac_prev[k]) / (1 - ac[k])
        c2 = (1 - ac_prev[k]) * np.sqrt(1 - betas[k]) / (1 - ac[k])
        frac = (variance_value + 1) / 2
        noise_var = np.exp(frac * np.log(betas[k]) + (1 - frac) * post_log[k]) if k > 0 else 0.0
        gain = c1 * x0_gain + c2
        mean, var = gain * mean + c1 * x0_offset, gain**2 * var + noise_var
    return mean, var


def test_iddpm_sample_reaches_the_guided_distribution_without_clipping():
    model, encoder = GaussianDataDiT(), FakeTextEncoder(PROMPTS, variance=0.8)
    prompts, z_size, scale = list(PROMPTS), (2, 8, 32, 32), 2.5
    sampler = IDDPM(num_sampling_steps=50, cfg_scale=scale)
    out = sampler.sample(model, encoder, z_size, prompts, "cpu", generator=torch.Generator().manual_seed(0),
                         progress=False)
    assert out.shape == (2, *z_size) and out.dtype == torch.float32

    kept = sorted(space_timesteps(1000, "50"))
    assert len(model.calls) == 50
    for call, timestep in zip(model.calls, reversed(kept)):
        assert call["timestep"].tolist() == [timestep] * 4 and call["timestep"].dtype == torch.long
        assert torch.equal(call["x"][:2], call["x"][2:])  # [x_half; x_half]
        assert torch.equal(call["y"][2:, 0], model.y_embedder.y_embedding.expand(2, -1, -1))  # [cond; null]
        assert call["mask"].shape == (2, 4)

    null_means = model.y_embedder.y_embedding[0].double().numpy()
    n_elements = math.prod(z_size[1:])
    for i, prompt in enumerate(prompts):
        for c in range(2):
            guided_mean = null_means[c] + scale * (PROMPTS[prompt][c] - null_means[c])  # e.g. 0 + 2.5 * 3
            mean, var = exact_chain_moments(kept, guided_mean, model.std, 0.8)
            values = out[i, c].double()
            assert abs(values.mean().item() - mean) < 5 * math.sqrt(var / n_elements), (prompt, c)
            assert abs(values.var().item() / var - 1) < 5 * math.sqrt(2 / n_elements), (prompt, c)
    assert out[0, 0].mean() > 7  # 7.5, far outside [-1, 1]: nothing clipped


def test_iddpm_sample_is_deterministic_with_a_generator_and_checks_its_inputs():
    model, encoder = GaussianDataDiT(), FakeTextEncoder(PROMPTS)
    sampler = IDDPM(timestep_respacing="5")

    def run(seed, **kwargs):
        return sampler.sample(model, encoder, (2, 1, 4, 4), ["a red ball"], "cpu",
                              generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    torch.manual_seed(3)
    first = sampler.sample(model, encoder, (2, 1, 4, 4), ["a red ball"], "cpu", progress=True)
    torch.manual_seed(3)
    assert torch.equal(first, sampler.sample(model, encoder, (2, 1, 4, 4), ["a red ball"], "cpu", progress=False))
    model.calls.clear()
    torch.testing.assert_close(run(1, dtype=torch.float64), run(1))
    assert model.calls[0]["x"].dtype == torch.float64 and model.calls[0]["y"].dtype == torch.float64

    with pytest.raises(ValueError, match=r"z_size must be the latent's \[C, T, H, W\]"):
        sampler.sample(model, encoder, (2, 4, 4), ["a red ball"], "cpu", progress=False)
    with pytest.raises(ValueError, match="model takes 2"):
        sampler.sample(model, encoder, (3, 1, 4, 4), ["a red ball"], "cpu", progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        sampler.sample(model, encoder, (2, 1, 4, 4), "a red ball", "cpu", progress=False)
    with pytest.raises(ValueError, match="cfg_channel must be in"):
        IDDPM(timestep_respacing="5", cfg_channel=5).sample(model, encoder, (2, 1, 4, 4), ["a red ball"], "cpu",
                                                            progress=False)
    with pytest.raises(TypeError, match="y_embedder.y_embedding"):
        sampler.sample(AffineModel(), encoder, (2, 1, 4, 4), ["a red ball"], "cpu", progress=False)


class RandomCaptions:
    """T5-shaped random captions for the tiny STDiT: y [n, 1, L, 24] and masks of 3, 5, ... real tokens."""

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        mask = (torch.arange(7)[None] < torch.arange(3, 3 + 2 * len(prompts), 2)[:, None]).long()
        return {"y": torch.randn(len(prompts), 1, 7, 24, generator=g), "mask": mask}


def test_iddpm_samples_with_the_tiny_stdit():
    from openvid_models import STDiT
    from tests.openvid_models.utils import tiny_model

    model, z_size = tiny_model(STDiT), (4, 3, 6, 10)

    def sample():
        return IDDPM(num_sampling_steps=3).sample(model, RandomCaptions(), z_size, ["a", "b"], "cpu",
                                                  generator=torch.Generator().manual_seed(0), progress=False)

    out = sample()
    assert out.shape == (2, *z_size) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, sample())
