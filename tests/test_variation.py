"""A1111's noise in the pipeline (`rng: a1111 | a1111-cpu`): the initial latent is A1111's first draw
for the seed (Philox, as an NVIDIA card draws it), variation seeds blend as A1111 blends them, and
every image is the same alone or in a batch. The noise values themselves are tested against Random123
and a scalar reference in test_noise.py; here, that the pipeline uses them as A1111 does."""

import numpy as np
import pytest
import torch

from sdbatch.jobs import JobError, load_job
from sdbatch.noise.philox import cuda_randn
from sdbatch.pipeline import Pipeline, Request, start
from sdbatch.recipe import Recipe

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_file("demo")


def recipe(**values) -> Recipe:
    return Recipe(**({"prompt": PROMPT, "size": (32, 32), "steps": 5, "sampler": "euler", "rng": "a1111"} | values))


def render(pipe: Pipeline, *recipes: Recipe) -> list[np.ndarray]:
    return [np.asarray(r.image).astype(int) for r in pipe.render([Request(x) for x in recipes])]


def test_the_initial_latent_is_a1111s_first_draw_for_the_seed(pipe, monkeypatch):
    seen = []
    real = start.from_noise

    def recording(plan, draw):
        noise = draw()
        seen.append(noise)
        return real(plan, lambda: noise)

    monkeypatch.setattr(start, "from_noise", recording)
    seeds = [7, 2**40 + 3]
    pipe.render([Request(recipe(seed=s)) for s in seeds])
    expected = np.stack([cuda_randn(s, tuple(seen[0].shape[1:])) for s in seeds])
    assert np.array_equal(seen[0].numpy(), expected)


def test_a1111_cpu_noise_is_torch_randn_after_manual_seed(pipe, monkeypatch):
    seen = []
    real = start.from_noise
    monkeypatch.setattr(start, "from_noise", lambda plan, draw: seen.append(draw()) or real(plan, lambda: seen[0]))
    pipe.render([Request(recipe(seed=11, rng="a1111-cpu"))])
    torch.manual_seed(11)
    assert torch.equal(seen[0][0], torch.randn(seen[0].shape[1:]))


def test_variation_strength_0_is_the_seed_and_1_is_the_subseed(pipe):
    seed, sub, half = render(pipe, recipe(seed=3), recipe(seed=9), recipe(seed=3, subseed=9, subseed_strength=0.5))
    [zero, one] = render(
        pipe, recipe(seed=3, subseed=9, subseed_strength=0.0), recipe(seed=3, subseed=9, subseed_strength=1.0)
    )
    assert np.array_equal(zero, seed) and np.array_equal(one, sub)  # euler: no step noise
    assert np.abs(half - seed).mean() > 1 and np.abs(half - sub).mean() > 1


def test_a_batch_of_mixed_strengths_and_resizes_equals_each_image_alone(pipe, monkeypatch):
    """Every draw (initial and each ancestral step's) is bitwise the image's own; the pictures then
    agree within the UNet's batch rounding (as in test_pipeline)."""
    recipes = [
        recipe(seed=5, sampler="euler_a", subseed=1, subseed_strength=s, seed_resize_from=r, ensd=31337)
        for s, r in ((0.0, None), (0.3, (48, 40)), (0.8, (16, 24)))
    ]
    draws: list[torch.Tensor] = []
    real = pipe._a1111_noise

    def recording(requests, shape):
        draw = real(requests, shape)
        return lambda: draws.append(draw()) or draws[-1]

    monkeypatch.setattr(pipe, "_a1111_noise", recording)
    together = render(pipe, *recipes)
    batch_draws, draws[:] = list(draws), []
    for k, r in enumerate(recipes):
        image = render(pipe, r)[0]
        assert all(torch.equal(a[k], b[0]) for a, b in zip(batch_draws, draws, strict=True))
        assert np.abs(image - together[k]).max() <= 1
        draws.clear()
    assert len(batch_draws) == 6 and not np.array_equal(together[0], together[1])  # initial + 5 steps


def test_ensd_changes_only_the_ancestral_steps(pipe):
    [plain], [shifted] = render(pipe, recipe(seed=4, ensd=0)), render(pipe, recipe(seed=4, ensd=31337))
    assert np.array_equal(plain, shifted), "euler draws no step noise: ENSD cannot change it"
    [plain] = render(pipe, recipe(seed=4, sampler="euler_a"))
    [shifted] = render(pipe, recipe(seed=4, sampler="euler_a", ensd=31337))
    assert np.abs(plain - shifted).mean() > 1


def test_a1111_noise_options_need_an_a1111_rng_and_parse_from_yaml(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"prompt: {PROMPT}\nensd: 31337\n")
    with pytest.raises(JobError, match=r"job.yaml:2: ensd: follows A1111's noise: set rng: a1111"):
        load_job(job).check(32, 7.0)
    job.write_text(f"prompt: {PROMPT}\nrng: CPU\nseed_resize_from: [64, 48]\nsubseed_strength: 0-1 [3]\n")
    runs = load_job(job).runs[0].values
    assert runs["rng"] == ["a1111-cpu"] and runs["seed_resize_from"] == [(64, 48)]
    assert runs["subseed_strength"] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("extra", "rng"),
    [("", "a1111"), (", RNG: CPU", "a1111-cpu"), (", RNG: NV", "a1111"), (", Version: sdbatch 0.1.0", "diffusers")],
)
def test_an_infotext_without_rng_means_a1111s_gpu_noise_unless_sdbatch_wrote_it(extra, rng):
    text = f"{PROMPT}\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32{extra}"
    assert Recipe.from_a1111(text).rng == rng
    text = "x\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32, Variation seed: 8, "
    text += "Variation seed strength: 0.4, Seed resize from: 64x48, ENSD: 31337"
    r = Recipe.from_a1111(text)
    assert (r.subseed, r.subseed_strength, r.seed_resize_from, r.ensd) == (8, 0.4, (64, 48), 31337)
    assert Recipe.from_a1111(text.replace("64x48", "-1x-1")).seed_resize_from is None
