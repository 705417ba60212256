"""IDDPM as OpenVid-1M / Open-Sora 1.0 train and sample with it (improved-diffusion's Gaussian diffusion).

* Schedule: ``diffusion_steps`` betas (linear 1e-4 .. 0.02 scaled by 1000 / steps, or the cosine
  ``squaredcos_cap_v2``), every table in float64; a table is gathered at the timesteps ``t [B]`` and cast to
  the working dtype of x.
* Model: ``model(x [B, C, ...], timestep [B], **model_kwargs) -> [B, 2C, ...]``: eps (or x_0, or the velocity
  v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 of Salimans & Ho) and, with
  ``learn_sigma``, the learned-range variance ``v`` in [-1, 1]: ``log var = (v+1)/2 log beta_t + (1-v)/2 log
  posterior_variance_t`` (clipped at t = 0).
* Training loss: MSE on the prediction (eps, x_0 or v) plus, with a learned variance, the variational-bound term
  (bits per dim) computed on the detached mean, so that it only trains the variance (decoder NLL at t = 0, KL
  elsewhere).
* Respacing (``timestep_respacing="100"``, ``"10,15,20"``, ``"ddim25"``): a shorter chain on the kept
  timesteps with betas recomputed from alphas_cumprod; the model is fed the original timestep (integer, not
  rescaled: ``rescale_timesteps`` False, as upstream).
* Sampling (:meth:`IDDPM.sample`): ancestral, no clipping of x_0, with classifier-free guidance
  (:func:`forward_with_cfg`).

Method names, arguments and returned keys are improved-diffusion's; the constructor of :class:`IDDPM` is
Open-Sora's (registered there as ``"iddpm"``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from openvid_models.text_encoder import null_caption

# ---------------------------------------------------------------------------------------------------------
# Beta schedules (float64)
# ---------------------------------------------------------------------------------------------------------

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """``[num_diffusion_timesteps]`` float64 betas: ``"linear"`` (Ho et al., stretched to keep the same curve
    for any number of steps) or ``"squaredcos_cap_v2"`` (Nichol & Dhariwal's cosine, betas capped at 0.999)."""
    if not isinstance(num_diffusion_timesteps, int) or num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be a positive int, got {num_diffusion_timesteps!r}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps,
                                   lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {schedule_name!r}")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas whose cumulative product of (1 - beta) follows ``alpha_bar(t)`` on t in [0, 1], capped."""
    steps = np.arange(num_diffusion_timesteps + 1) / num_diffusion_timesteps
    bar = np.array([alpha_bar(t) for t in steps], dtype=np.float64)
    return np.minimum(1 - bar[1:] / bar[:-1], max_beta)


# ---------------------------------------------------------------------------------------------------------
# Gaussian helpers (nats unless said otherwise)
# ---------------------------------------------------------------------------------------------------------

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean over every dimension but the first."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise (broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that the reference losses were computed with."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability of x (8-bit values scaled to [-1, 1]) under N(means, exp(log_scales)^2) integrated over
    the bin of width 2/255 around x; the outermost bins extend to infinity. Same shape as x."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"x, means and log_scales must have one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class ModelMeanType(enum.Enum):
    EPSILON = "epsilon"  # the model predicts the noise
    START_X = "start_x"  # the model predicts x_0
    VELOCITY = "velocity"  # the model predicts v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0


class ModelVarType(enum.Enum):
    LEARNED_RANGE = "learned_range"  # v in [-1, 1] between posterior_variance (clipped) and beta, in log space
    FIXED_SMALL = "fixed_small"  # posterior_variance
    FIXED_LARGE = "fixed_large"  # beta (posterior_variance at t = 0)


class LossType(enum.Enum):
    MSE = "mse"  # MSE (+ the vb term when the variance is learned)
    RESCALED_MSE = "rescaled_mse"  # vb term scaled by num_timesteps / 1000
    KL = "kl"  # the variational bound alone
    RESCALED_KL = "rescaled_kl"  # ... times num_timesteps (an estimate of the full bound)


# ---------------------------------------------------------------------------------------------------------
# Gaussian diffusion
# ---------------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """Training and sampling utilities of a discrete Gaussian diffusion over ``betas`` (float64 tables with
    improved-diffusion's names). ``t`` is an integer tensor ``[B]`` of indices into this diffusion's steps;
    x and everything returned are ``[B, C, ...]`` in x's dtype."""

    def __init__(self, *, betas, model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
                 model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE, loss_type: LossType = LossType.MSE):
        self.model_mean_type = ModelMeanType(model_mean_type)
        self.model_var_type = ModelVarType(model_var_type)
        self.loss_type = LossType(loss_type)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a 1-D array of at least 2 steps with values in (0, 1], got "
                             f"{len(betas) if betas.ndim == 1 else tuple(betas.shape)} steps")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log takes t = 1's value there.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- tables -------------------------------------------------------------------------------------------

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at ``t [B]`` as ``[B, 1, ...]`` in like's dtype (gathered in float64)."""
        key = (name, t.device)
        if key not in self._on_device:
            self._on_device[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        return self._on_device[key][t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],) or t.is_floating_point():
            raise ValueError(f"t must be an integer tensor [B] = [{x.shape[0]}] of timestep indices, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.device.type == "cpu" and len(t) and not (0 <= int(t.min()) and int(t.max()) < self.num_timesteps):
            raise ValueError(f"t must lie in [0, {self.num_timesteps}), got {t.tolist()}")

    def _model_forward(self, model, x, t, model_kwargs):
        """The model's output at step indices t (respacing maps them to the original timesteps)."""
        out = model(x, t, **(model_kwargs or {}))
        return out["x"] if isinstance(out, dict) else out

    # -- forward process ----------------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        self._check_t(t, x_start)
        return (self._gather("sqrt_alphas_cumprod", t, x_start) * x_start,
                self._gather("_one_minus_alphas_cumprod", t, x_start).expand_as(x_start),
                self._gather("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start))

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(alphas_cumprod[t]) x_0 + sqrt(1 - alphas_cumprod[t]) noise (noise ~ N(0, I) if None)."""
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise must have x_start's shape {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        return (self._gather("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start and x_t must have one shape, got {tuple(x_start.shape)}, {tuple(x_t.shape)}")
        self._check_t(t, x_t)
        mean = (self._gather("posterior_mean_coef1", t, x_t) * x_start
                + self._gather("posterior_mean_coef2", t, x_t) * x_t)
        return (mean, self._gather("posterior_variance", t, x_t).expand_as(x_t),
                self._gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t))

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_xstart_from_v(self, x_t, t, v):
        return (self._gather("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._gather("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    # -- reverse process ----------------------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """p(x_{t-1} | x_t) from ``model(x, t, **model_kwargs)``: a dict of ``mean``, ``variance``,
        ``log_variance`` and ``pred_xstart`` (x_0, after ``denoised_fn`` and, if ``clip_denoised``, [-1, 1])."""
        self._check_t(t, x)
        return self._p_mean_variance_from_output(self._model_forward(model, x, t, model_kwargs), x, t,
                                                 clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        B, C = x.shape[:2]
        learned = self.model_var_type == ModelVarType.LEARNED_RANGE
        expected = (B, 2 * C if learned else C, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            what = "x's channels and the learned-range variance" if learned else "x's channels"
            raise ValueError(f"the model must return {expected} ({what}), got {tuple(model_output.shape)}")
        model_output = model_output.to(x.dtype)
        if learned:
            model_output, var_values = model_output.split(C, dim=1)
            frac = (var_values + 1) / 2
            log_variance = (frac * self._gather("log_betas", t, x)
                            + (1 - frac) * self._gather("posterior_log_variance_clipped", t, x))
            variance = torch.exp(log_variance)
        else:
            large = self.model_var_type == ModelVarType.FIXED_LARGE
            # Fixed large: beta, but posterior_variance at t = 0 (a better decoder likelihood), as upstream.
            names = ("_large_variance", "_large_log_variance") if large else \
                ("posterior_variance", "posterior_log_variance_clipped")
            variance = self._gather(names[0], t, x).expand_as(x)
            log_variance = self._gather(names[1], t, x).expand_as(x)

        def process_xstart(x0):
            x0 = denoised_fn(x0) if denoised_fn is not None else x0
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            pred_xstart = process_xstart(self._predict_xstart_from_v(x, t, model_output))
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    @property
    def _large_variance(self):
        return np.append(self.posterior_variance[1], self.betas[1:])

    @property
    def _large_log_variance(self):
        return np.log(self._large_variance)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generator=None):
        """One ancestral step: ``{"sample": x_{t-1}, "pred_xstart": x_0}``; no noise where t == 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator=None):
        """x_0 ``shape`` from ``noise`` (drawn if None) through every step of this diffusion (no grad)."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn,
                                                    model_kwargs, device, progress, generator):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False, generator=None):
        """Yields :meth:`p_sample`'s dict at each step, from t = num_timesteps - 1 down to 0."""
        shape = tuple(shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have the shape {shape}, got {tuple(noise.shape)}")
            x = noise.to(device) if device is not None else noise
        else:
            if device is None:
                device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
            x = torch.randn(shape, generator=generator, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415  (only for the progress bar)
            steps = tqdm(steps)
        for i in steps:
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, generator)
            yield out
            x = out["sample"]

    # -- training -----------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=True):
        """The bound's term at t in bits per dim ``[B]``: the decoder NLL at t == 0, KL(q || p) elsewhere."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Losses ``[B]`` at timesteps t: ``{"loss", "mse", "vb"}`` (``vb`` with a learned variance; KL loss
        types give ``{"loss"}`` only). The vb term sees the mean prediction detached: it trains the variance
        channels only, as in improved-diffusion."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._model_forward(model, x_t, t, model_kwargs)
        terms = {}
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            terms["loss"] = self._vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        C = x_t.shape[1]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"the model must return {2 * C} channels (x's and the learned-range variance), "
                                 f"got {tuple(model_output.shape)}")
            mean_output, var_values = model_output.split(C, dim=1)
            frozen = torch.cat([mean_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)  # the original 1000-step weighting
            model_output = mean_output
        if self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            target = (self._gather("sqrt_alphas_cumprod", t, x_start) * noise
                      - self._gather("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(f"the model's prediction must have x's shape {tuple(target.shape)}, "
                             f"got {tuple(model_output.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


# ---------------------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------------------

def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The original timesteps to keep: ``section_counts`` splits [0, num_timesteps) into equal sections and
    takes that many evenly strided (rounded) steps from each, e.g. ``"100"`` or ``"10,15,20"``; ``"ddimN"``
    takes DDIM's fixed integer stride ``range(0, num_timesteps, stride)`` of exactly N steps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _respacing_int(section_counts[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep_respacing {section_counts!r}: no integer stride gives exactly {desired} "
                             f"of {num_timesteps} steps")
        section_counts = [_respacing_int(part, section_counts) for part in section_counts.split(",")]
    counts = list(section_counts)
    if not counts or any(not isinstance(c, (int, np.integer)) or c < 1 for c in counts):
        raise ValueError(f"timestep_respacing section counts must be positive ints, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"timestep_respacing: cannot take {count} steps from a section of {size} "
                             f"(of {num_timesteps} diffusion steps)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # accumulated, as upstream: it decides the ties
            position += stride
        start += size
    return set(kept)


def _respacing_int(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"timestep_respacing must be a step count ('100'), comma-separated section counts "
                         f"('10,15,20') or 'ddimN', got {whole!r}") from None


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion over the kept original timesteps ``use_timesteps``: betas recomputed from alphas_cumprod
    so that q(x_t | x_0) is unchanged at every kept step. Methods take indices into the kept steps; the model
    is called with the original timesteps (``timestep_map[t]``)."""

    def __init__(self, use_timesteps: Iterable[int], *, betas, **kwargs):
        base = GaussianDiffusion(betas=betas, **kwargs)
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(int(i) for i in use_timesteps)
        if len(self.use_timesteps) < 2 or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= base.num_timesteps:
            raise ValueError(f"the respacing must keep at least 2 of the timesteps [0, {base.num_timesteps}), got "
                             f"{sorted(self.use_timesteps)[:10]}")
        self.timestep_map = sorted(self.use_timesteps)
        kept = base.alphas_cumprod[self.timestep_map]
        # Open-Sora rounds these betas to float32 (torch.FloatTensor); kept in float64 here (the difference is
        # below 1e-7 relative on alphas_cumprod).
        super().__init__(betas=1.0 - kept / np.append(1.0, kept[:-1]), **kwargs)
        self._map_on_device: dict[torch.device, torch.Tensor] = {}

    def _model_forward(self, model, x, t, model_kwargs):
        if t.device not in self._map_on_device:
            self._map_on_device[t.device] = torch.tensor(self.timestep_map, device=t.device, dtype=torch.long)
        return super()._model_forward(model, x, self._map_on_device[t.device][t], model_kwargs)


# ---------------------------------------------------------------------------------------------------------
# Classifier-free guidance and the text-to-video samplers' shared inputs
# ---------------------------------------------------------------------------------------------------------

def forward_with_cfg(model, x, timestep, y, cfg_scale, cfg_channel=None, **kwargs):
    """Classifier-free guidance in one batched forward (GLIDE / Open-Sora): ``x [2n, C, ...]`` whose first half
    is the state (the second half is ignored: both halves get ``x[:n]``), ``y [2n, ...]`` = [cond; null],
    ``timestep [2n]``. The model's first ``cfg_channel`` output channels (default: half of them, the eps of a
    learned-variance model) become ``uncond + cfg_scale * (cond - uncond)`` in both halves; the other channels
    (the variance) pass through unguided. Returns the model output's shape ``[2n, C_out, ...]``."""
    if x.shape[0] % 2:
        raise ValueError(f"x must stack [cond; uncond] halves (an even batch), got batch {x.shape[0]}")
    half = x[: x.shape[0] // 2]
    out = model(torch.cat([half, half]), timestep, y=y, **kwargs)
    out = out["x"] if isinstance(out, dict) else out
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"the model returned batch {out.shape[0]} for a batch of {x.shape[0]}")
    if cfg_channel is None:
        cfg_channel = out.shape[1] // 2
    if not 0 < cfg_channel <= out.shape[1]:
        raise ValueError(f"cfg_channel must be in [1, {out.shape[1]}] (the model's output channels), "
                         f"got {cfg_channel}")
    eps, rest = out[:, :cfg_channel], out[:, cfg_channel:]
    cond, uncond = eps.chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def check_cfg_channel(cfg_channel):
    if cfg_channel is not None and (not isinstance(cfg_channel, int) or cfg_channel < 1):
        raise ValueError(f"cfg_channel must be a positive int or None, got {cfg_channel!r}")
    return cfg_channel


def guided_sampling_inputs(model, text_encoder, z_size, prompts, device, additional_args, generator, dtype):
    """Validated (n, z_size, z [n, *z_size] float32, model_kwargs with y [2n] = [cond; null] and the caption
    mask [n, L], a model callable casting x and y to ``dtype`` and returning float32)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    z_size = tuple(z_size) if isinstance(z_size, (tuple, list, torch.Size)) else z_size
    if not isinstance(z_size, tuple) or len(z_size) != 4 or not all(isinstance(s, int) and s > 0 for s in z_size):
        raise ValueError(f"z_size must be the latent's [C, T, H, W] (4 positive ints, no batch), got {z_size!r}")
    in_channels = getattr(model, "in_channels", None)
    if isinstance(in_channels, int) and in_channels != z_size[0]:
        raise ValueError(f"z_size has {z_size[0]} channels but the model takes {in_channels}")
    if not hasattr(getattr(model, "y_embedder", None), "y_embedding"):
        raise TypeError("model must carry its null caption as model.y_embedder.y_embedding (a STDiT / MVDiT)")
    n = len(prompts)
    z = torch.randn((n, *z_size), generator=generator, device=device)
    model_kwargs = dict(text_encoder.encode(list(prompts)))
    y = model_kwargs["y"].to(device)
    if y.shape[0] != n:
        raise ValueError(f"text_encoder.encode returned y for {y.shape[0]} captions, expected {n}")
    null = null_caption(model, n).to(device=device, dtype=y.dtype)
    model_kwargs["y"] = torch.cat([y, null])
    if "mask" in model_kwargs and model_kwargs["mask"] is not None:
        model_kwargs["mask"] = model_kwargs["mask"].to(device)  # [n, L]: the model repeats it for the null half
    if additional_args is not None:
        model_kwargs.update(additional_args)

    def call(x, timestep, y, **kwargs):
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        out = model(x, timestep, y=y, **kwargs)
        return (out["x"] if isinstance(out, dict) else out).float()

    return n, z_size, z, model_kwargs, call


# ---------------------------------------------------------------------------------------------------------
# IDDPM (Open-Sora's scheduler "iddpm")
# ---------------------------------------------------------------------------------------------------------

class IDDPM(SpacedDiffusion):
    """Open-Sora's IDDPM: a :class:`SpacedDiffusion` with eps prediction and a learned-range variance by
    default (``predict_xstart``: the model predicts x_0; ``predict_v``: the velocity v, whose MSE weighs an error
    in x_0 about equally at every noise level, where eps's fades out where the noise dominates).
    ``num_sampling_steps`` (or ``timestep_respacing``, not both) respaces the 1000-step chain for sampling; leave
    both None for training. ``cfg_scale`` (7.0 as the OpenVid-1M inference configs; the class default upstream is
    4.0) and ``cfg_channel`` (None: the latent channels, i.e. the eps half of a learned-variance output, which is
    what upstream's default ``out_channels // 2`` amounts to) are :meth:`sample`'s guidance."""

    def __init__(self, num_sampling_steps=None, timestep_respacing=None, noise_schedule="linear", use_kl=False,
                 sigma_small=False, predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                 diffusion_steps=1000, cfg_scale=7.0, cfg_channel=None, predict_v=False):
        betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
        if predict_xstart and predict_v:
            raise ValueError("give predict_xstart or predict_v, not both")
        if num_sampling_steps is not None:
            if timestep_respacing is not None:
                raise ValueError("give num_sampling_steps or timestep_respacing, not both")
            if not isinstance(num_sampling_steps, int) or num_sampling_steps < 1:
                raise ValueError(f"num_sampling_steps must be a positive int, got {num_sampling_steps!r}")
            timestep_respacing = str(num_sampling_steps)
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [diffusion_steps]
        loss_type = (LossType.RESCALED_KL if use_kl else
                     LossType.RESCALED_MSE if rescale_learned_sigmas else LossType.MSE)
        var_type = (ModelVarType.LEARNED_RANGE if learn_sigma else
                    ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE)
        super().__init__(space_timesteps(diffusion_steps, timestep_respacing), betas=betas,
                         model_mean_type=(ModelMeanType.START_X if predict_xstart else
                                          ModelMeanType.VELOCITY if predict_v else ModelMeanType.EPSILON),
                         model_var_type=var_type, loss_type=loss_type)
        self.cfg_scale = float(cfg_scale)
        self.cfg_channel = check_cfg_channel(cfg_channel)

    def sample(self, model, text_encoder, z_size, prompts, device, additional_args=None, *, generator=None,
               progress=True, dtype=None):
        """Latents ``[n, C, T, H, W]`` (float32) for ``n = len(prompts)``, ``z_size = [C, T, H, W]``.

        As upstream: z ~ N(0, I) ``[n, ...]`` is drawn first (from ``generator``, else the global RNG), the chain
        runs on [z; z] with ``text_encoder.encode(prompts)`` and the model's null caption as y = [cond; null],
        each step drawing noise for all 2n rows, no clipping; the cond half is returned. ``dtype``: the model's
        parameter dtype, x and y are cast to it for the call (the chain stays float32)."""
        n, z_size, z, model_kwargs, call = guided_sampling_inputs(model, text_encoder, z_size, prompts, device,
                                                            additional_args, generator, dtype)
        cfg_channel = self.cfg_channel if self.cfg_channel is not None else z_size[0]

        def guided(x, timestep, **kwargs):
            return forward_with_cfg(call, x, timestep, cfg_scale=self.cfg_scale, cfg_channel=cfg_channel, **kwargs)

        samples = self.p_sample_loop(guided, (2 * n, *z_size), torch.cat([z, z]), clip_denoised=False,
                                     model_kwargs=model_kwargs, device=device, progress=progress,
                                     generator=generator)
        return samples[:n]
