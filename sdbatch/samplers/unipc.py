"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) on the denoised estimates of the last
steps, and after each model call a corrector (UniC) that redoes the step just made with that new
estimate too, at no extra model call; data prediction, in lambda = -log(sigma).

diffusers (compat diffusers): `UniPCMultistepScheduler.from_config` of SD 1.x's scheduler config,
i.e. its defaults: solver_type bh2, solver_order 2, lower_order_final, timestep_spacing "linspace"
(dpmpp_2m's timesteps: 999, 832, ..., 166 for 6 steps), final sigma 0 (the last step returns the
denoised estimate), predict_x0. One model call per step.
A1111 ("UniPC", compat a1111): its port of the original code, variant bh1, order 3, lower order
final, on its own time grid, ending above sigma 0 (timesteps.py); the same algorithm otherwise.

`sample` tells which from the plan: a plan ending at sigma 0 is diffusers' (bh2, order 2), one ending
above it A1111's (bh1, order 3); `variant` and `order` override that. The order of step k is
min(order, k + 1, steps - k): warm-up, and lower order at the end. (A1111 refuses fewer steps than
its order; this lowers the order.)
"""

import numpy as np
import torch
from torch import Tensor

from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan


def plan(schedule: NoiseSchedule, steps: int) -> StepPlan:
    # integer timesteps over steps + 1 points, the last dropped (diffusers' "linspace" spacing)
    return StepPlan.at(schedule, np.linspace(0, schedule.train_steps - 1, steps + 1).round()[::-1][:-1].copy(), True)


def _coefficients(lambdas: list[float], lambda_t: float, order: int, variant: str, corrector: bool):
    """(h_phi_1, B(h), rks, rhos) of the step from lambdas[-1] to lambda_t with the estimates at
    `lambdas` (oldest first): the predictor's rhos weigh the D1s, the corrector's the D1s and then D1_t."""
    h = lambda_t - lambdas[-1]
    hh = -h  # data prediction
    h_phi_1 = np.expm1(hh)
    b_h = hh if variant == "bh1" else np.expm1(hh)
    rks = [(lambdas[-(i + 1)] - lambdas[-1]) / h for i in range(1, order)] + [1.0]
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(rows), np.array(b)
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
    elif order == 1:
        rhos = []
    elif order == 2:
        rhos = [0.5]
    else:
        rhos = list(np.linalg.solve(R[:-1, :-1], b[:-1]))
    return h_phi_1, b_h, rks[:-1], rhos


def _update(
    x: Tensor,
    s: Tensor,
    s_t: Tensor,
    history: list[Tensor],
    lambdas: list[float],
    lambda_t: float,
    order: int,
    variant: str,
    model_t: Tensor | None = None,
) -> Tensor:
    """The predictor from x at sigma s to s_t, or with `model_t` (the estimate at s_t) the corrector."""
    h_phi_1, b_h, rks, rhos = _coefficients(lambdas, lambda_t, order, variant, model_t is not None)
    m0 = history[-1]
    d1s = [(history[-(i + 2)] - m0) / rk for i, rk in enumerate(rks)]
    x_t = (s_t / s) * x - float(h_phi_1) * m0
    residual = sum((float(rho) * d for rho, d in zip(rhos, d1s, strict=False)), torch.zeros_like(x))
    if model_t is not None:
        residual = residual + float(rhos[-1]) * (model_t - m0)
    return x_t - float(b_h) * residual


def sample(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    noise: NoiseSource = None,
    after_step: AfterStep = None,
    variant: str | None = None,
    order: int | None = None,
) -> Tensor:
    a1111 = bool(sigmas[-1] > 0)
    variant = variant or ("bh1" if a1111 else "bh2")
    order = order or (3 if a1111 else 2)
    n = len(sigmas) - 1
    levels = sigmas.detach().cpu().double().numpy()
    lambdas = [float(-np.log(s)) if s > 0 else float("inf") for s in levels]
    history: list[Tensor] = []  # the denoised estimates of the last `order` steps, oldest first
    last, last_order = x, 0  # the latent the last step started from, and that step's order
    for i in range(n):
        denoised = model(x, i)
        if i:  # correct the step just made with the estimate at its end
            x = _update(
                last,
                sigmas[i - 1],
                sigmas[i],
                history,
                lambdas[i - len(history) : i],
                lambdas[i],
                last_order,
                variant,
                denoised,
            )
        history = [*history[-(order - 1) :], denoised] if order > 1 else [denoised]
        step_order = min(order, i + 1, n - i)
        last, last_order = x, step_order
        if levels[i + 1] == 0:  # order 1 (the last step): its limit at sigma 0 is the estimate
            x = denoised
        else:
            x = _update(
                x,
                sigmas[i],
                sigmas[i + 1],
                history,
                lambdas[i + 1 - len(history) : i + 1],
                lambdas[i + 1],
                step_order,
                variant,
            )
        if after_step:
            x = after_step(i, x)
    return x
