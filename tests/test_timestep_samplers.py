"""DDIM, PLMS and UniPC ("timestep" samplers) under both conventions, and A1111's Brownian noise.

compat diffusers: against diffusers' PNDMScheduler / UniPCMultistepScheduler stepping, configured as SD
1.x pipelines configure them. compat a1111: DDIM and PLMS against transcriptions of A1111's VP-space
loops (`modules/sd_samplers_timesteps_impl.py`, A1111 1.6-1.10) written out here, UniPC against
diffusers' UniPCMultistepScheduler set up as A1111's UniPC (bh1, order 3, lower order final) on A1111's
time grid. All on the Gaussian test denoiser of test_samplers.py / test_kdiffusion.py.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from diffusers import PNDMScheduler, UniPCMultistepScheduler
from helpers import BETAS, max_diff

from sdbatch.noise import philox
from sdbatch.pipeline import Pipeline, Request
from sdbatch.recipe import Recipe
from sdbatch.samplers import NoiseSchedule, get_sampler, img2img_start
from sdbatch.samplers import timesteps as a1111_timesteps
from sdbatch.samplers.brownian import BrownianNoise

SEEDS = (11, 12)
SHAPE = (4, 8, 8)
TOLERANCE = 1e-5
DIFFUSERS = NoiseSchedule()  # diffusers' float32 alphas
LDM = NoiseSchedule.compvis()  # the checkpoints' own, which A1111 reads


def noise(seed: int = 0) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(s + seed) for s in SEEDS]
    return torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens])


X0 = torch.randn(len(SEEDS), *SHAPE, generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def unet():
    """The tiny random UNet of the test denoiser, with one thread (hundreds of calls of a tiny model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = make_tiny().unet
    ctx = torch.randn(len(SEEDS), 77, 32, generator=torch.Generator().manual_seed(3))
    yield lambda x, t: net(x, t, ctx)
    torch.set_num_threads(threads)


def predictor(unet, alphas: torch.Tensor):
    """eps(x_vp, t): the exact E[noise | x] for data ~ N(0, 0.25) plus half a tiny random UNet, so that
    every timestep, sigma and solver-order mistake shows (tests/test_samplers.py's denoiser)."""
    table = alphas.double().numpy()

    def eps(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(len(x))
        a = torch.from_numpy(np.interp(t.double().numpy(), np.arange(1000), table)).float()[:, None, None, None]
        return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.5 * unet(x, t)

    return eps


def ours(eps, plan, x):
    """Our sampler on `plan` from the VE latent x, the UNet told the plan's timesteps; the VP result."""
    name = ours.name

    def model(x, i):
        s = plan.sigmas[i]
        return x - s * eps(x / (s**2 + 1).sqrt(), plan.timesteps[i])

    with torch.no_grad():
        out = get_sampler(name).sample(model, x, plan.sigmas, None)
    return plan.to_vp(out)


# -- compat diffusers: diffusers' schedulers as SD 1.x's config makes them


def diffusers_scheduler(name: str):
    pndm = PNDMScheduler(**BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return pndm if name == "plms" else UniPCMultistepScheduler.from_config(pndm.config)


def run_diffusers(name, eps, steps, strength):
    sched = diffusers_scheduler(name)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength is None:
        x = noise() * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline: timesteps[t_start * order:], noised to the first of them
        start = img2img_start(steps, strength)
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        x = sched.add_noise(X0, noise(), timesteps[:1].repeat(len(SEEDS)))
    with torch.no_grad():
        for t in timesteps:
            x = sched.step(eps(x, t), t, x).prev_sample
    return x


def run_ours_diffusers(name, eps, steps, strength):
    plan = get_sampler(name).plan(DIFFUSERS, steps)
    if strength is None:
        x = noise() * plan.initial_noise_scale()
    else:
        plan = plan.from_step(img2img_start(steps, strength))
        x = plan.noised(X0, noise())
    ours.name = name
    return ours(eps, plan, x)


CASES = [pytest.param(6, None, id="6-txt2img")] + [
    pytest.param(steps, strength, id=f"{steps}-img2img{strength}") for steps in (6, 13) for strength in (0.3, 0.75)
]
CASES.insert(1, pytest.param(13, None, id="13-txt2img"))


@pytest.mark.parametrize("name", ["plms", "unipc"])
@pytest.mark.parametrize(("steps", "strength"), CASES)
def test_compat_diffusers_matches_diffusers_schedulers(unet, name, steps, strength):
    eps = predictor(unet, DIFFUSERS.alphas_cumprod)
    theirs = run_diffusers(name, eps, steps, strength)
    mine = run_ours_diffusers(name, eps, steps, strength)
    assert torch.isfinite(mine).all()
    assert max_diff(mine, theirs) <= TOLERANCE


def test_diffusers_plans():
    plms = get_sampler("plms").plan(DIFFUSERS, 50)
    sched = diffusers_scheduler("plms")
    sched.set_timesteps(50)
    assert plms.timesteps.tolist() == sched.timesteps.tolist()[:3] + list(range(941, 0, -20))
    assert plms.timesteps.tolist()[:3] == [981, 961, 961]
    unipc = diffusers_scheduler("unipc")
    assert (unipc.config.solver_type, unipc.config.solver_order, unipc.config.timestep_spacing) == (
        "bh2",
        2,
        "linspace",
    )
    unipc.set_timesteps(13)
    plan = get_sampler("unipc").plan(DIFFUSERS, 13)
    assert plan.timesteps.tolist() == unipc.timesteps.tolist()
    assert torch.allclose(plan.sigmas, unipc.sigmas, rtol=1e-6, atol=0) and plan.sigmas[-1] == 0


# -- compat a1111: A1111's loops, transcribed


def a1111_grid(steps: int) -> torch.Tensor:
    """CompVisSampler.get_timesteps."""
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def a1111_ddim(eps, x, timesteps, alphas_cumprod):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[F.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps(x, timesteps[index].item() * s_in)
        a_t = alphas[index].item() * s_in
        a_prev = alphas_prev[index].item() * s_in
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_in
        a_t, a_prev, sqrt_one_minus_at = (v[:, None, None, None] for v in (a_t, a_prev, sqrt_one_minus_at))
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t
    return x


def a1111_plms(eps, x, timesteps, alphas_cumprod):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[F.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones([x.shape[0]])
    old_eps = []

    def get_x_prev(x, e_t, index):
        a_t = (alphas[index].item() * s_in)[:, None, None, None]
        a_prev = (alphas_prev[index].item() * s_in)[:, None, None, None]
        sqrt_one_minus_at = (sqrt_one_minus_alphas[index].item() * s_in)[:, None, None, None]
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = eps(x, ts)
        if len(old_eps) == 0:
            x_prev = get_x_prev(x, e_t, index)
            e_t_next = eps(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev = get_x_prev(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x


def a1111_unipc(eps, x, timesteps, alphas_cumprod, is_img2img):
    """A1111's UniPC (bh1, order 3, time-uniform, lower order final) run by diffusers' UniPC stepping:
    A1111's NoiseScheduleVP('discrete') time grid and sigmas set into the scheduler."""
    total_n = len(alphas_cumprod)
    t_start = timesteps[-1] / 1000 + 1 / 1000 if is_img2img else 1.0
    steps = len(timesteps)
    t = torch.linspace(t_start, 1.0 / total_n, steps + 1)
    t_array = torch.linspace(0.0, 1.0, total_n + 1)[1:]
    log_alpha_array = 0.5 * torch.log(alphas_cumprod)
    log_alpha = torch.from_numpy(np.interp(t.double().numpy(), t_array.double().numpy(), log_alpha_array.numpy()))
    sigma_vp = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
    sched = UniPCMultistepScheduler(**BETAS, solver_type="bh1", solver_order=3, lower_order_final=True)
    sched.set_timesteps(steps)
    sched.sigmas = (sigma_vp / torch.exp(log_alpha)).float()  # diffusers' sigma is the VE one
    sched.timesteps = torch.arange(steps, 0, -1)
    sched.set_begin_index(0)
    model_t = (t - 1.0 / total_n) * 1000.0
    with torch.no_grad():
        for k, label in enumerate(sched.timesteps):
            x = sched.step(eps(x, model_t[k]), label, x).prev_sample
    return x


A1111_LOOPS = {"ddim": a1111_ddim, "plms": a1111_plms}


def run_a1111(name, eps, steps, strength):
    ac = LDM.alphas_cumprod
    timesteps = a1111_grid(steps)
    if strength is None:
        x = noise()
    else:  # sample_img2img
        t_enc = int(min(strength, 0.999) * steps)
        a = ac[timesteps[t_enc]]
        x = X0 * torch.sqrt(a) + noise() * torch.sqrt(1 - a)
        timesteps = timesteps[:t_enc]
    with torch.no_grad():
        if name == "unipc":
            return a1111_unipc(eps, x, timesteps, ac, strength is not None)
        return A1111_LOOPS[name](eps, x, timesteps, ac)


def run_ours_a1111(name, eps, steps, strength):
    plan = a1111_timesteps.a1111_plan(LDM, name, steps, strength)
    x = noise() * plan.initial_noise_scale() if strength is None else plan.noised(X0, noise())
    ours.name = name
    return ours(eps, plan, x)


@pytest.mark.parametrize("name", ["ddim", "plms", "unipc"])
@pytest.mark.parametrize(("steps", "strength"), CASES)
def test_compat_a1111_matches_a1111s_loops(unet, name, steps, strength):
    eps = predictor(unet, LDM.alphas_cumprod)
    theirs = run_a1111(name, eps, steps, strength)
    mine = run_ours_a1111(name, eps, steps, strength)
    assert torch.isfinite(mine).all()
    assert max_diff(mine, theirs) <= TOLERANCE


def test_a1111_grid_and_call_counts():
    assert a1111_timesteps.grid(50).tolist() == list(range(1, 1000, 20))
    assert a1111_timesteps.grid(13).tolist() == a1111_grid(13).tolist() and len(a1111_timesteps.grid(13)) == 14
    for steps, points in ((50, 50), (13, 14), (6, 7), (8, 8)):
        ddim, plms, unipc = (len(a1111_timesteps.a1111_plan(LDM, n, steps)) for n in ("ddim", "plms", "unipc"))
        assert (ddim, plms, unipc) == (points - 1, points, points)
    plan = a1111_timesteps.a1111_plan(LDM, "ddim", 20, strength=0.75)  # grid 1, 51, ..., 951; t_enc 15
    assert plan.timesteps[0] == 701 and len(plan) == 14 and plan.timesteps[-1] == 51
    assert float(plan.noise_sigma) == pytest.approx(float(LDM.sigmas[751]))  # noised one point above
    assert float(plan.sigmas[-1]) == pytest.approx(float(LDM.sigmas[1]))  # ends at t 1, not 0


# -- A1111's Brownian noise on any device


def tree_increments(seeds, sigmas, x):
    """k-diffusion's BrownianTreeNoiseSampler, torchsde trees queried between successive sigmas."""
    import torchsde

    t0, t1 = sigmas[sigmas > 0].min(), sigmas.max()
    trees = [torchsde.BrownianTree(t0, torch.zeros_like(x[0]), t1, entropy=s) for s in seeds]
    out = []
    for s, s_next in itertools.pairwise(sigmas[:-1]):
        w = torch.stack([tree(s_next, s) for tree in trees]) * -1
        out.append(w / (s_next - s).abs().sqrt())
    return out


def our_increments(seeds, sigmas, x, source):
    noise_sampler = BrownianNoise(x, seeds, sigmas, source)
    return [noise_sampler(s, s_next) for s, s_next in itertools.pairwise(sigmas[:-1])]


SIGMAS = torch.tensor([14.6, 9.1, 5.2, 2.5, 1.1, 0.4, 0.1, 0.0])


@pytest.mark.filterwarnings("ignore:Should have t")
def test_brownian_cpu_source_is_torchsdes_own_on_the_cpu():
    x = torch.zeros(len(SEEDS), *SHAPE)
    theirs = tree_increments(SEEDS, SIGMAS, x)
    for mine, expected in zip(our_increments(SEEDS, SIGMAS, x, "a1111-cpu"), theirs, strict=True):
        assert torch.equal(mine, expected)


@pytest.mark.filterwarnings("ignore:Should have t")
def test_brownian_a1111_source_draws_cuda_randn(monkeypatch):
    """A1111's hook (`torchsde_randn` = randn_local(seed, size), on an NVIDIA GPU CUDA's randn of a
    fresh generator) applied to torchsde, against ours: same numbers, and every normal of ours is
    `philox.cuda_randn(seed, size)` (draw 0) for the seeds torchsde asks for."""
    from torchsde._brownian import brownian_interval

    x = torch.zeros(len(SEEDS), *SHAPE)
    original = brownian_interval._randn
    asked: list[tuple[int, tuple]] = []

    def a1111_hook(size, dtype, device, seed):
        asked.append((int(seed), tuple(size)))
        return torch.from_numpy(philox.cuda_randn(int(seed), size)).to(device=device, dtype=dtype)

    monkeypatch.setattr(brownian_interval, "_randn", a1111_hook)
    theirs = tree_increments(SEEDS, SIGMAS, x)
    monkeypatch.setattr(brownian_interval, "_randn", original)

    drawn: list[tuple[int, tuple, int]] = []
    real = philox.cuda_randn

    def spy(seed, shape, draw=0):
        drawn.append((seed, tuple(shape), draw))
        return real(seed, shape, draw)

    monkeypatch.setattr(philox, "cuda_randn", spy)
    mine = our_increments(SEEDS, SIGMAS, x, "a1111")
    assert brownian_interval._randn is original  # swapped only while our trees draw
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a, b)
    assert drawn and [(s, shape) for s, shape, _ in drawn] == asked
    assert {d for _, _, d in drawn} == {0} and {shape for _, shape, _ in drawn} == {SHAPE}
    cpu = our_increments(SEEDS, SIGMAS, x, "a1111-cpu")
    assert not torch.equal(cpu[0], mine[0])  # the sources differ


# -- the pipeline: A1111's counts of model calls, and the rules


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_file("demo")


def unet_calls(pipe, monkeypatch, recipe, image=None) -> list[torch.Tensor]:
    """The contexts of the UNet calls of one render (cfg 1: one UNet call per model call)."""
    seen: list[torch.Tensor] = []
    unet = pipe.unet
    monkeypatch.setattr(pipe, "unet", lambda x, t, context: seen.append(context) or unet(x, t, context))
    [result] = pipe.render([Request(recipe, init_image=image)])
    monkeypatch.setattr(pipe, "unet", unet)
    assert result.ok
    return seen


def recipe(**values) -> Recipe:
    base = {"prompt": "a red circle", "size": (32, 32), "steps": 8, "seed": 2, "cfg": 1.0}
    return Recipe(**(base | values))


@pytest.mark.parametrize(
    ("sampler", "a1111", "a1111_img2img", "diffusers"),
    [("ddim", 7, 5, 8), ("plms", 8, 6, 9), ("unipc", 8, 6, 8)],
)
def test_pipeline_renders_them_with_a1111s_call_counts(pipe, monkeypatch, sampler, a1111, a1111_img2img, diffusers):
    """8 steps: A1111's grid has 8 points (1000 // 8 = 125): DDIM 7 calls, PLMS 8, UniPC 8; img2img at
    0.75: t_enc 6, so DDIM 5, PLMS 6, UniPC 6. diffusers: DDIM 8, PLMS 9 (its first step twice), UniPC 8."""
    from PIL import Image

    assert len(unet_calls(pipe, monkeypatch, recipe(sampler=sampler, compat="a1111"))) == a1111
    assert len(unet_calls(pipe, monkeypatch, recipe(sampler=sampler))) == diffusers
    image = Image.new("RGB", (32, 32), "red")
    r = recipe(sampler=sampler, compat="a1111", init_image="x.png", strength=0.75)
    assert len(unet_calls(pipe, monkeypatch, r, image)) == a1111_img2img


def test_plms_under_a1111_switches_prompts_by_model_call(pipe, monkeypatch):
    """A1111's CFGDenoiser counts model calls: PLMS's extra first call is call 1, so `[a:b:3]` of 8
    steps switches after the 4th call (the 3rd step), not after the 4th step."""
    calls = unet_calls(
        pipe, monkeypatch, recipe(sampler="plms", compat="a1111", prompt="[a red circle:a blue square:3]")
    )
    first, second = (pipe.encode_prompt(p) for p in ("a red circle", "a blue square"))
    names = ["first" if torch.equal(c, first) else "second" if torch.equal(c, second) else "?" for c in calls]
    assert names[:4] == ["first"] * 4 and set(names[4:]) == {"second"}, names


def test_recipe_rules():
    for name in ("ddim", "plms", "unipc"):
        recipe(sampler=name, compat="a1111").check()
        with pytest.raises(Exception, match="schedule types apply to the k-diffusion samplers"):
            recipe(sampler=name, schedule="exponential").check()
    for name in ("ddpm", "lcm"):
        with pytest.raises(Exception, match=f"{name} walks diffusers' fixed timesteps"):
            recipe(sampler=name, compat="a1111").check()
    assert Recipe.from_a1111("p\nSteps: 8, Sampler: UniPC, CFG scale: 7, Seed: 1, Size: 32x32").sampler == "unipc"
    assert math.isfinite(float(a1111_timesteps.a1111_plan(LDM, "plms", 8).sigmas[-1]))


@pytest.mark.parametrize("sampler", ["ddim", "plms", "unipc"])
def test_runs_of_no_model_call_under_a1111_are_refused_at_validate(sampler):
    """A1111's grid can leave nothing to run (DDIM calls the model at all points but the last): such
    a recipe is refused when the job is read, not after a first pass has rendered. The counts come
    from A1111's loops: txt2img len(range(0, 1000, 1000 // steps)) points; img2img t_enc =
    int(min(s, 0.999) * steps) points, hires' fixed steps - 1."""
    from sdbatch.recipe import Recipe

    def refused(**fields) -> bool:
        recipe = Recipe(prompt="a", sampler=sampler, compat="a1111", **fields)
        return any("runs no step" in message for _, message in recipe.problems())

    points = {"ddim": 2, "plms": 2, "unipc": 1}[sampler]  # the fewest grid points that make a model call
    assert refused(steps=1) == (points > 1)
    assert not refused(steps=2)
    img2img = dict(init_image="x.png", strength=1.0)
    # strength 1 is 0.999 in A1111: int(0.999 * steps) points, one short of steps
    assert refused(steps=points, **img2img) and not refused(steps=points + 1, **img2img)
    hires = dict(steps=4, hires_scale=2.0, strength=0.5)
    assert refused(hires_steps=points, **hires) and not refused(hires_steps=points + 1, **hires)
