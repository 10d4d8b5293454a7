"""Linear multistep (`sample_lms`, A1111's "LMS"): each step integrates, from sigma_i to sigma_i+1, the
polynomial through the slopes of the last (up to) 4 steps. k-diffusion integrates the Lagrange basis
with scipy's `quad`; these are polynomials of degree < 4, which Gauss-Legendre quadrature with 4 nodes
integrates exactly, so the same coefficients come without scipy."""

import numpy as np
from torch import Tensor

from .schedule import AfterStep, NoiseSchedule, NoiseSource, SigmaDenoiser, StepPlan
from .sigmas import automatic_plan

ORDER = 4


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "LMS", karras)


def coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """The weight of each of the last `order` slopes (newest first) in the step from sigmas[i] to
    sigmas[i + 1]: the integral over that step of its Lagrange basis polynomial on sigmas[i], sigmas[i - 1], ..."""
    nodes, weights = np.polynomial.legendre.leggauss(ORDER)
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    tau = (a + b) / 2 + (b - a) / 2 * nodes
    points = [float(sigmas[i - k]) for k in range(order)]
    result = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - points[k]) / (points[j] - points[k])
        result.append(float((b - a) / 2 * np.dot(weights, basis)))
    return result


def sample(
    model: SigmaDenoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource = None, after_step: AfterStep = None
) -> Tensor:
    levels = sigmas.detach().cpu().double().numpy()
    slopes: list[Tensor] = []  # the last ORDER slopes, oldest first
    for i in range(len(sigmas) - 1):
        slopes = [*slopes[-(ORDER - 1) :], (x - model(x, i)) / sigmas[i]]
        weights = coefficients(levels, i, len(slopes))
        x = x + sum(w * d for w, d in zip(weights, reversed(slopes), strict=True))
        if after_step:
            x = after_step(i, x)
    return x
