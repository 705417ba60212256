"""DPM-Solver++ (Lu et al. 2022): multistep, data prediction, order 2, as Open-Sora 1.0 / OpenVid-1M's fast
sampler ("dpm-solver", 20 steps, time-uniform, multistep order 2) on the IDDPM model's eps.

The discrete-time VP schedule of DPM-Solver's ``NoiseScheduleVP("discrete")``: the N training betas give
``log alpha_n = 0.5 * sum_{i<=n} log(1 - beta_i)`` at continuous times ``t_n = (n + 1) / N``, linearly
interpolated in between, sigma = sqrt(1 - alpha^2), lambda = log(alpha / sigma); the ODE is solved from t = 1 to
t = 1 / N. The model is fed the discrete timestep ``N * t - 1`` (a float, 999 .. 0 for N = 1000; DPM-Solver's
``1000 * (t - 1 / N)``, equal for the released N = 1000). Schedule coefficients are computed in float64 per step
(upstream: float32) and applied to a float32 state. Guidance batches [cond; null] as IDDPM does (upstream's
DPM-Solver wrapper batches [null; cond]: the same results, the model being batch-independent).
"""

from __future__ import annotations

import numpy as np
import torch

from openvid_models.diffusion import (check_cfg_channel, forward_with_cfg, get_named_beta_schedule,
                                      guided_sampling_inputs)

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


PREDICTIONS = ("eps", "v")


class DiscreteVPSchedule:
    """alpha_t, sigma_t, lambda_t of a discrete-time diffusion on continuous t in [1 / N, 1] (float64 numpy).

    Where the half-logSNR at the end falls below -5.1 (cosine schedules), those last steps are cut, as
    DPM-Solver does for stability; ``total_N`` is then the steps left."""

    def __init__(self, betas, clipped_lambda: float = -5.1):
        log_alphas = 0.5 * np.cumsum(np.log1p(-np.asarray(betas, dtype=np.float64)))
        lambdas = log_alphas - 0.5 * np.log(-np.expm1(2.0 * log_alphas))
        cut = int(np.sum(lambdas < clipped_lambda))
        self.log_alpha_array = log_alphas[: len(log_alphas) - cut]
        self.total_N = len(self.log_alpha_array)
        if self.total_N < 2:
            raise ValueError("the schedule must keep at least 2 steps with a half-logSNR above -5.1")
        self.t_array = np.arange(1, self.total_N + 1, dtype=np.float64) / self.total_N

    def log_alpha(self, t):
        return np.interp(t, self.t_array, self.log_alpha_array)

    def sigma(self, t):
        return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t):
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam):
        """t with lambda_t = lam (log alpha is monotone in t)."""
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, dtype=np.float64))
        return np.interp(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])

    def model_time(self, t):
        """The discrete timestep the model was trained on: t = (n + 1) / N -> n, linear in between."""
        return self.total_N * np.asarray(t, dtype=np.float64) - 1.0


class DPMSolverSampler:
    """Open-Sora's "dpm-solver" scheduler: multistep DPM-Solver++ (``order`` 2: first step order 1, then
    second-order multistep; order 1 is DDIM) over ``num_sampling_steps`` model evaluations, with
    classifier-free guidance at ``cfg_scale``. The model's learned-variance channels are dropped. ``prediction``:
    what the model's first channels are, ``"eps"`` (the released models) or ``"v"`` (the velocity
    ``alpha_t eps - sigma_t x_0``, e.g. the embedded default of ``train/run.py``).

    ``lower_order_final``: whether the last step is first order. None (default): only below 10 steps, the rule
    of the DPM-Solver that Open-Sora 1.0 / OpenVid-1M ship, so at 20-25 steps every step after the first is
    second order, as there; True: always (DPM-Solver's later default; more accurate where the last step is a
    long one in log-SNR, as with time-uniform steps); False: never."""

    def __init__(self, num_sampling_steps=20, cfg_scale=7.0, cfg_channel=None, diffusion_steps=1000,
                 noise_schedule="linear", skip_type="time_uniform", order=2, lower_order_final=None,
                 prediction="eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2 (multistep DPM-Solver++), got {order!r}")
        if not isinstance(num_sampling_steps, int) or num_sampling_steps < order:
            raise ValueError(f"num_sampling_steps must be an int >= order ({order}), got {num_sampling_steps!r}")
        if skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = float(cfg_scale)
        self.cfg_channel = check_cfg_channel(cfg_channel)
        self.skip_type = skip_type
        self.order = order
        self.lower_order_final = lower_order_final
        self.prediction = prediction
        self.schedule = DiscreteVPSchedule(get_named_beta_schedule(noise_schedule, diffusion_steps))

    def time_steps(self) -> np.ndarray:
        """``[num_sampling_steps + 1]`` continuous times from 1 down to 1 / N (float64)."""
        ns, steps = self.schedule, self.num_sampling_steps
        t_T, t_0 = 1.0, 1.0 / ns.total_N
        if self.skip_type == "logSNR":
            return ns.inverse_lambda(np.linspace(ns.lambda_(t_T), ns.lambda_(t_0), steps + 1))
        if self.skip_type == "time_quadratic":
            return np.linspace(t_T**0.5, t_0**0.5, steps + 1) ** 2
        return np.linspace(t_T, t_0, steps + 1)

    def solve(self, eps_fn, x: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Integrates the diffusion ODE from x at t = 1 (noise) to t = 1 / N. ``eps_fn(x, model_time) -> eps``
        (v with ``prediction="v"``) like x, ``model_time`` a float (the discrete timestep); called
        ``num_sampling_steps`` times."""
        ns, steps = self.schedule, self.num_sampling_steps
        ts = self.time_steps()
        log_alpha = ns.log_alpha(ts)
        alpha, sigma, lam = np.exp(log_alpha), ns.sigma(ts), ns.lambda_(ts)
        model_times = ns.model_time(ts)

        def data_prediction(x, i):
            eps = eps_fn(x, float(model_times[i]))
            if eps.shape != x.shape:
                raise ValueError(f"eps_fn must return x's shape {tuple(x.shape)}, got {tuple(eps.shape)}")
            if self.prediction == "v":  # x_0 = alpha x - sigma v
                return float(alpha[i]) * x - float(sigma[i]) * eps
            return (x - float(sigma[i]) * eps) / float(alpha[i])

        older, latest = None, data_prediction(x, 0)
        step_range = range(1, steps + 1)
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415  (only for the progress bar)
            step_range = tqdm(step_range)
        for i in step_range:
            order = min(self.order, i)  # the first step has one model value only
            if self.lower_order_final or (self.lower_order_final is None and steps < 10):
                order = min(order, steps + 1 - i)
            h = lam[i] - lam[i - 1]
            phi = np.expm1(-h)
            # x_t = sigma_t / sigma_s x_s - alpha_t (e^-h - 1) D, D the data prediction (order 1) ...
            update = latest
            if order == 2:  # ... plus half the divided difference over the previous step ("dpmsolver" type)
                r = (lam[i - 1] - lam[i - 2]) / h
                update = latest + (0.5 / r) * (latest - older)
            x = float(sigma[i] / sigma[i - 1]) * x - float(alpha[i] * phi) * update
            if i < steps:  # no model value is needed after the last step
                older, latest = latest, data_prediction(x, i)
        return x

    def sample(self, model, text_encoder, z_size, prompts, device, additional_args=None, *, generator=None,
               progress=True, dtype=None):
        """Latents ``[n, C, T, H, W]`` (float32) for ``n = len(prompts)``, ``z_size = [C, T, H, W]``.

        z ~ N(0, I) ``[n, ...]`` is drawn (from ``generator``, else the global RNG); each model call is one
        batched forward over [x; x] with y = [cond; null caption] and timestep [2n] (float), guided on the
        first ``cfg_channel`` channels (None: C), of which eps is the first C. ``dtype``: the model's parameter
        dtype, x and y are cast to it for the call (the solver state stays float32)."""
        n, z_size, z, model_kwargs, call = guided_sampling_inputs(model, text_encoder, z_size, prompts, device,
                                                            additional_args, generator, dtype)
        channels = z_size[0]
        cfg_channel = self.cfg_channel if self.cfg_channel is not None else channels

        def eps_fn(x, model_time):
            timestep = torch.full((2 * n,), model_time, device=x.device, dtype=torch.float32)
            out = forward_with_cfg(call, torch.cat([x, x]), timestep, cfg_scale=self.cfg_scale,
                                   cfg_channel=cfg_channel, **model_kwargs)
            if out.shape[1] not in (channels, 2 * channels):
                raise ValueError(f"the model must return {channels} or {2 * channels} channels (eps, and the "
                                 f"learned variance), got {out.shape[1]}")
            return out[:n, :channels]

        with torch.no_grad():
            return self.solve(eps_fn, z, progress=progress)
