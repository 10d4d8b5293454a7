"""The k-diffusion samplers and A1111's schedule types against k-diffusion itself, driven as A1111 1.10
drives it: its sigmas, its img2img rule, its per-image noise and Brownian trees.

The oracle is k-diffusion's own `sampling.py` and `external.py` (`pip install --no-deps k-diffusion
torchsde torchdiffeq trampoline`, with scipy and tqdm). Its package `__init__` imports clip, wandb and
more, and its `utils.py` torchvision, none of which those two files need but for `utils.append_dims`:
so `k_diffusion_oracle()` registers a stub package `_kdiffusion_oracle` whose `utils` holds only
k-diffusion's `append_dims`, and executes the two installed files as its modules (found with
`importlib.util.find_spec`, which does not run the real package).
"""

import importlib.util
import itertools
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny
from helpers import max_diff
from scipy import stats

from sdbatch.samplers import SAMPLERS, NoiseSchedule, a1111_img2img, get_sampler
from sdbatch.samplers import lms as our_lms
from sdbatch.samplers import sigmas as schedules
from sdbatch.samplers.brownian import BrownianNoise

SEEDS = (11, 12)
SHAPE = (4, 8, 8)
ORACLE = "_kdiffusion_oracle"


def k_diffusion_oracle() -> types.ModuleType:
    if ORACLE in sys.modules:
        return sys.modules[ORACLE]
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None, "the oracle: pip install --no-deps k-diffusion torchsde torchdiffeq trampoline"
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType(ORACLE)
    package.__path__ = [str(root)]
    utils = types.ModuleType(f"{ORACLE}.utils")

    def append_dims(x, target_dims):  # k-diffusion's utils.append_dims
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules[ORACLE], sys.modules[utils.__name__] = package, utils
    for name in ("sampling", "external"):
        module_spec = importlib.util.spec_from_file_location(f"{ORACLE}.{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        setattr(package, name, module)
    return package


kd = k_diffusion_oracle()


def ldm_alphas_cumprod() -> torch.Tensor:
    """LDM's `register_schedule` ("linear" betas, sqrt-spaced, in float64), stored as float32: the
    `alphas_cumprod` buffer of SD 1.x checkpoints that A1111's `CompVisDenoiser` reads."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)


ALPHAS = ldm_alphas_cumprod()
SCHEDULE = NoiseSchedule.compvis()

# A1111 1.10 `samplers_k_diffusion`: A1111 name -> our name, k-diffusion function, options
A1111 = {
    "LMS": ("lms", "sample_lms", {}),
    "Heun": ("heun", "sample_heun", {}),
    "DPM2": ("dpm2", "sample_dpm_2", {"scheduler": "karras", "discard_next_to_last_sigma": True}),
    "DPM2 a": ("dpm2_a", "sample_dpm_2_ancestral", {"scheduler": "karras", "discard_next_to_last_sigma": True}),
    "DPM++ 2S a": ("dpmpp_2s_a", "sample_dpmpp_2s_ancestral", {"scheduler": "karras"}),
    "DPM++ SDE": ("dpmpp_sde", "sample_dpmpp_sde", {"scheduler": "karras", "brownian_noise": True}),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True}),
    "DPM++ 2M SDE Heun": (
        "dpmpp_2m_sde_heun",
        "sample_dpmpp_2m_sde",
        {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
    ),
    "DPM++ 3M SDE": (
        "dpmpp_3m_sde",
        "sample_dpmpp_3m_sde",
        {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
    ),
    # ours before these, whose `sample` is k-diffusion's too (their plans follow diffusers)
    "Euler": ("euler", "sample_euler", {}),
    "Euler a": ("euler_a", "sample_euler_ancestral", {}),
    "DPM++ 2M": ("dpmpp_2m", "sample_dpmpp_2m", {"scheduler": "karras"}),
}
NEW = [label for label in A1111 if label not in ("Euler", "Euler a", "DPM++ 2M")]


@pytest.fixture(scope="module")
def predict():
    """tests/test_samplers.py's noise predictor: the exact E[noise | x] for data ~ N(0, 0.25), which
    makes every sigma and solver-order mistake show, plus a tiny random UNet for a nonlinear part."""
    unet = make_tiny().unet
    ctx = torch.randn(len(SEEDS), 77, 32, generator=torch.Generator().manual_seed(3))
    alphas = ALPHAS.double().numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of calls of a tiny model: threads only get in each other's way

    def eps(x, t):
        a = torch.from_numpy(np.interp(t.double().numpy(), np.arange(1000), alphas)).float()[:, None, None, None]
        exact = (1 - a).sqrt() * x / (0.25 * a + 1 - a)
        return exact + 0.5 * unet(x, t, ctx)

    yield eps
    torch.set_num_threads(threads)


def theirs_denoiser(eps):
    """A1111's model wrapper: k-diffusion's `CompVisDenoiser` (a `DiscreteEpsDDPMDenoiser` over the
    model's alphas_cumprod), the UNet told `sigma_to_t(sigma)`, its input scaled by 1 / sqrt(sigma^2 + 1)."""
    return kd.external.DiscreteEpsDDPMDenoiser(eps, ALPHAS, quantize=False)


def our_denoiser(eps, plan):
    """What the pipeline does: model(x, i) at the plan's step, model(x, i, sigma) anywhere else."""

    def model(x, i, sigma=None):
        s = plan.sigmas[i] if sigma is None else sigma
        t = plan.timesteps[i] if sigma is None else schedules.sigma_to_t(SCHEDULE, sigma)
        return x - s * eps(x / (s**2 + 1).sqrt(), t.expand(len(x)))

    return model


def draws():
    """Per-image noise: one generator per image, each call the next draw of every image (A1111's
    ImageRNG, which k-diffusion's `torch.randn_like` is routed to)."""
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return lambda: torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens])


def a1111_sigmas(denoiser, label: str, karras: bool, steps: int) -> torch.Tensor:
    """A1111's `KDiffusionSampler.get_sigmas` with the "Automatic" (or "Karras") schedule."""
    options = A1111[label][2]
    discard = options.get("discard_next_to_last_sigma", False)
    steps += 1 if discard else 0
    scheduler = "karras" if karras else options.get("scheduler")
    sigma_min, sigma_max = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    if scheduler is None:
        sigmas = denoiser.get_sigmas(steps)
    else:
        make = {"karras": kd.sampling.get_sigmas_karras, "exponential": kd.sampling.get_sigmas_exponential}[scheduler]
        sigmas = make(n=steps, sigma_min=sigma_min, sigma_max=sigma_max, device="cpu")
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def run_theirs(label, karras, steps, strength, eps, x0):
    """A1111's `sample` / `sample_img2img` (1.10), with `setup_img2img_steps` for img2img."""
    denoiser = theirs_denoiser(eps)
    options = A1111[label][2]
    sigmas = a1111_sigmas(denoiser, label, karras, steps)
    noise = draws()
    if x0 is None:
        x, sched = noise() * sigmas[0], sigmas
    else:
        t_enc = int(min(strength, 0.999) * steps)
        sched = sigmas[steps - t_enc - 1 :]
        x = x0 + noise() * sched[0]
    kwargs = {}
    if options.get("brownian_noise"):  # `create_noise_sampler`: the whole schedule's range, the image seeds
        kwargs["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(
            x if x0 is None else x0, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(SEEDS)
        )
    elif A1111[label][0] in ("dpm2_a", "dpmpp_2s_a", "euler_a"):
        kwargs["noise_sampler"] = lambda sigma, sigma_next: noise()
    if "solver_type" in options:
        kwargs["solver_type"] = options["solver_type"]
    func = getattr(kd.sampling, A1111[label][1])
    return func(denoiser, x, sched, disable=True, **kwargs)


def run_ours(name, karras, steps, strength, eps, x0, plan_of=None):
    sampler = get_sampler(name)
    plan_of = plan_of or (lambda total: sampler.plan(SCHEDULE, total, karras))
    noise = draws()
    if x0 is None:
        full = plan = plan_of(steps)
        x = noise() * plan.initial_noise_scale()
    else:
        total, start = a1111_img2img(steps, strength)
        full = plan_of(total)
        plan = full.from_step(start)
        x = x0 + noise() * plan.sigmas[0]
    if sampler.brownian:  # as A1111 builds it, from the whole schedule
        draw = kd.sampling.BrownianTreeNoiseSampler(x if x0 is None else x0, *_range(full.sigmas), seed=list(SEEDS))
    else:
        draw = noise
    with torch.no_grad():
        return sampler.sample(our_denoiser(eps, plan), x, plan.sigmas, draw)


def _range(sigmas):
    return sigmas[sigmas > 0].min(), sigmas.max()


VARIANTS = [(label, False) for label in NEW] + [
    (label, True) for label in NEW if A1111[label][2].get("scheduler") != "karras"
]
STRENGTHS = pytest.mark.parametrize("strength", [None, 0.3, 0.75], ids=["txt2img", "img2img0.3", "img2img0.75"])


def _x0(strength):
    return None if strength is None else torch.randn(len(SEEDS), *SHAPE, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize(
    ("label", "karras"), VARIANTS, ids=[f"{A1111[n][0]}{'-karras' if k else ''}" for n, k in VARIANTS]
)
@pytest.mark.parametrize("steps", [6, 13])
@STRENGTHS
def test_sampler_matches_k_diffusion(predict, label, karras, steps, strength):
    x0 = _x0(strength)
    theirs = run_theirs(label, karras, steps, strength, predict, x0)
    ours = run_ours(A1111[label][0], karras, steps, strength, predict, x0)
    assert torch.isfinite(ours).all()
    assert max_diff(ours, theirs) <= 1e-5


@pytest.mark.parametrize("label", ["Euler", "Euler a", "DPM++ 2M"])
@pytest.mark.parametrize("steps", [6, 13])
@STRENGTHS
def test_older_samplers_are_k_diffusions_on_a1111_plans(predict, label, steps, strength):
    """euler, euler_a and dpmpp_2m plan as diffusers does, but step as k-diffusion does: on A1111's
    plan they give A1111's picture (euler_a's extra draw after its last step changes nothing)."""
    x0 = _x0(strength)
    theirs = run_theirs(label, False, steps, strength, predict, x0)
    plan_of = lambda total: schedules.automatic_plan(SCHEDULE, total, label)  # noqa: E731
    ours = run_ours(A1111[label][0], False, steps, strength, predict, x0, plan_of)
    assert max_diff(ours, theirs) <= 1e-5


def test_table_knows_each_k_diffusion_sampler():
    for label in NEW:
        name, _, options = A1111[label]
        sampler = SAMPLERS[name]
        assert (sampler.a1111, sampler.karras, sampler.brownian) == (label, True, bool(options.get("brownian_noise")))
        assert schedules.AUTOMATIC[label] == options.get("scheduler", "uniform")
        assert (label in schedules.DISCARD_NEXT_TO_LAST) == options.get("discard_next_to_last_sigma", False)


def test_discarding_keeps_the_step_count():
    plan = get_sampler("dpm2").plan(SCHEDULE, 10)
    assert len(plan) == 10 and plan.sigmas[-1] == 0
    kept = schedules.karras(SCHEDULE, 11)
    assert torch.equal(plan.sigmas, torch.cat([kept[:-2], kept[-1:]]))


def test_schedule_is_ldms():
    assert torch.equal(SCHEDULE.alphas_cumprod, ALPHAS)
    assert torch.equal(torch.from_numpy(SCHEDULE.sigmas), theirs_denoiser(None).sigmas)
    assert (round(float(SCHEDULE.sigmas[0]), 4), round(float(SCHEDULE.sigmas[-1]), 4)) == (0.0292, 14.6146)


def test_sigma_to_t_and_back_are_k_diffusions():
    denoiser = theirs_denoiser(None)
    sigmas = torch.cat([schedules.karras(SCHEDULE, 17)[:-1], torch.tensor([0.0292, 0.5, 14.6146, 1.0])])
    assert torch.equal(schedules.sigma_to_t(SCHEDULE, sigmas), denoiser.sigma_to_t(sigmas))
    for sigma in sigmas:  # one at a time, as a model call asks
        assert torch.equal(schedules.sigma_to_t(SCHEDULE, sigma), denoiser.sigma_to_t(sigma))
    t = torch.tensor([0.0, 0.25, 10.5, 500.0, 998.9, 999.0])
    assert torch.equal(schedules.t_to_sigma(SCHEDULE, t), denoiser.t_to_sigma(t))


# -- A1111 1.10's schedule types (`modules/sd_schedulers.py`), ported where k-diffusion has none


def a1111_sgm_uniform(n, sigma_min, sigma_max, inner):
    start, end = inner.sigma_to_t(torch.tensor(sigma_max)), inner.sigma_to_t(torch.tensor(sigma_min))
    return torch.FloatTensor([inner.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]] + [0.0])


def a1111_normal(n, sigma_min, sigma_max, inner):
    start, end = inner.sigma_to_t(torch.tensor(sigma_max)), inner.sigma_to_t(torch.tensor(sigma_min))
    return torch.FloatTensor([inner.t_to_sigma(ts) for ts in torch.linspace(start, end, n)] + [0.0])


def a1111_simple(n, sigma_min, sigma_max, inner):
    step = len(inner.sigmas) / n
    return torch.FloatTensor([float(inner.sigmas[-(1 + int(k * step))]) for k in range(n)] + [0.0])


def a1111_ddim(n, sigma_min, sigma_max, inner):
    picked, step, k = [], max(len(inner.sigmas) // n, 1), 1
    while k < len(inner.sigmas):
        picked.append(float(inner.sigmas[k]))
        k += step
    return torch.FloatTensor([*picked[::-1], 0.0])


def a1111_kl_optimal(n, sigma_min, sigma_max, inner):
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    k = torch.arange(n + 1)
    return torch.tan(k / n * alpha_min + (1.0 - k / n) * alpha_max)


def a1111_align_your_steps(n, sigma_min, sigma_max, inner):
    sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n == len(sigmas):
        return torch.FloatTensor([*sigmas, 0.0])
    ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1]))
    return torch.FloatTensor(np.append(np.exp(ys)[::-1].copy(), [0.0]))


def a1111_beta(n, sigma_min, sigma_max, inner, alpha=0.6, beta=0.6):
    quantiles = [stats.beta.ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0])


ORACLE_SCHEDULES = {
    "uniform": lambda n, lo, hi, inner: inner.get_sigmas(n),
    "karras": lambda n, lo, hi, inner: kd.sampling.get_sigmas_karras(n, lo, hi),
    "exponential": lambda n, lo, hi, inner: kd.sampling.get_sigmas_exponential(n, lo, hi),
    "polyexponential": lambda n, lo, hi, inner: kd.sampling.get_sigmas_polyexponential(n, lo, hi),
    "sgm_uniform": a1111_sgm_uniform,
    "kl_optimal": a1111_kl_optimal,
    "align_your_steps": a1111_align_your_steps,
    "simple": a1111_simple,
    "normal": a1111_normal,
    "ddim": a1111_ddim,
    "beta": a1111_beta,
}


@pytest.mark.parametrize("schedule_type", list(schedules.SCHEDULES))
@pytest.mark.parametrize("steps", [1, 6, 11, 13, 20, 50])
def test_schedule_type_matches_a1111(schedule_type, steps):
    inner = theirs_denoiser(None)
    lo, hi = inner.sigmas[0].item(), inner.sigmas[-1].item()
    theirs = ORACLE_SCHEDULES[schedule_type](steps, lo, hi, inner)
    ours = schedules.SCHEDULES[schedule_type](SCHEDULE, steps)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert (ours[-1] == 0) == (schedule_type != "kl_optimal")
    plan = schedules.a1111_plan(SCHEDULE, steps, schedule_type)
    assert torch.equal(plan.timesteps, inner.sigma_to_t(ours[:-1]))


def test_every_a1111_schedule_type_has_a_label():
    assert set(schedules.LABELS) == set(schedules.SCHEDULES) == set(ORACLE_SCHEDULES)
    with pytest.raises(ValueError, match="unknown schedule type 'linear'; known: uniform, karras"):
        schedules.a1111_plan(SCHEDULE, 10, "linear")


@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 0.7), (2.0, 1.2)])
def test_beta_quantiles_match_scipy(a, b):
    for q in [0.0, 1e-9, 0.01, 0.2, 0.5, 0.77, 0.99, 1 - 1e-9, 1.0]:
        assert schedules.beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "sigmas", [schedules.uniform(SCHEDULE, 13), schedules.karras(SCHEDULE, 6)], ids=["uniform", "karras"]
)
def test_lms_coefficients_match_scipys_quadrature(sigmas):
    levels = sigmas.numpy()
    for i in range(len(levels) - 1):
        order = min(i + 1, our_lms.ORDER)
        ours = our_lms.coefficients(levels.astype(np.float64), i, order)
        theirs = [kd.sampling.linear_multistep_coeff(order, levels, i, j) for j in range(order)]
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_brownian_noise_is_k_diffusions_tree():
    sigmas = schedules.karras(SCHEDULE, 8)
    x = torch.zeros(len(SEEDS), *SHAPE)
    ours = BrownianNoise(x, SEEDS, sigmas)
    theirs = kd.sampling.BrownianTreeNoiseSampler(x, *_range(sigmas), seed=list(SEEDS))
    for s, s_next in itertools.pairwise(sigmas[:-1]):
        mid = s.log().lerp(s_next.log(), 0.5).exp()
        for a, b in ((s, s_next), (s, mid), (s_next, s)):
            assert torch.equal(ours(a, b), theirs(a, b))
    alone = BrownianNoise(x[1:], SEEDS[1:], sigmas)  # an image's noise does not depend on its batch
    assert torch.equal(alone(sigmas[2], sigmas[3]), ours(sigmas[2], sigmas[3])[1:])
    with pytest.raises(ValueError, match="one seed per image"):
        BrownianNoise(x, SEEDS[:1], sigmas)


@pytest.mark.parametrize(
    ("steps", "strength", "fixed", "expected"),
    [
        (20, 0.75, None, (20, 4)),  # t_enc 15: 16 steps run, from sigmas[4]
        (20, 1.0, None, (20, 0)),  # min(strength, 0.999): all 20
        (20, 0.3, None, (20, 13)),
        (6, 0.1, None, (6, 5)),  # t_enc 0: still one step
        (20, 0.45, 10, (22, 12)),  # hires: Hires steps 10 run of int(10 / 0.45) = 22
        (20, 1.0, 20, (20, 0)),
    ],
)
def test_a1111_img2img_rule(steps, strength, fixed, expected):
    assert a1111_img2img(steps, strength, fixed) == expected
    total, start = expected
    t_enc = (fixed - 1) if fixed else int(min(strength, 0.999) * steps)
    assert start == total - t_enc - 1  # A1111: sigmas[steps - t_enc - 1:]


def test_sde_samplers_take_plain_draws_too(predict):
    """Without a tree (diffusers-style noise) an SDE sampler runs on per-image draws."""
    plan = get_sampler("dpmpp_2m_sde").plan(SCHEDULE, 6)
    noise = draws()
    x = noise() * plan.sigmas[0]
    with torch.no_grad():
        out = get_sampler("dpmpp_2m_sde").sample(our_denoiser(predict, plan), x, plan.sigmas, lambda s, n: noise())
    assert torch.isfinite(out).all() and math.isfinite(float(out.std()))
