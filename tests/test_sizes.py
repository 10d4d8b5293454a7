"""Every size the README promises (multiples of 8, tiny and non-square included) renders, not only
multiples of 64: the UNet upsamples to its skip connections' sizes, as diffusers does."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from helpers import max_diff, request, shake_norms
from PIL import Image
from test_models import TOL, carried
from test_pipeline import assert_close, ours, pixels, theirs

from sdbatch.models import CONFIGS, SDConfig, StableDiffusion, VAEConfig, build_model
from sdbatch.pipeline import Pipeline, RequestError, Tuning, image_tensor, mask_tensor, tiled_decode
from sdbatch.tokenizer import Tokenizer, bundled_tokenizer

# SD's UNet shape (three downsamplings, attention at the first three levels) at a width that runs
# in milliseconds: a latent side must survive 3 halvings, as 520 or 776 px (65, 97 cells) must in SD
SD_SHAPED = SDConfig(
    "sd-shaped",
    unet=replace(CONFIGS["sd15"].unet, model_channels=16, num_heads=2, context_dim=32, norm_groups=8),
    vae=CONFIGS["tiny"].vae,
    clip=CONFIGS["tiny"].clip,
)


def random_model(cfg: "str | SDConfig", seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    model = build_model(cfg).eval().requires_grad_(False)
    shake_norms(model, seed)
    return model


@pytest.mark.parametrize("config", ["tiny", "tiny-inpainting", "demo", SD_SHAPED], ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize("hw", [(65, 97), (1, 1), (3, 5), (2, 7), (13, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_unet_matches_diffusers_at_any_latent_size(config, hw):
    model = random_model(config)
    ref = carried(model, "unet")
    u = model.config.unet
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, u.in_channels, *hw, generator=g)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, u.context_dim, generator=g)
    with torch.no_grad():
        mine = model.unet(x, t, context)
        theirs_ = ref(x, t, encoder_hidden_states=context).sample
    assert mine.shape == (2, u.out_channels, *hw)
    assert max_diff(mine, theirs_) <= TOL


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (13, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_vae_round_trips_any_multiple_of_its_factor(hw):
    model = random_model("tiny")
    ref = carried(model, "vae")
    g = torch.Generator().manual_seed(8)
    x = torch.rand(1, 3, hw[0] * 8, hw[1] * 8, generator=g) * 2 - 1
    with torch.no_grad():
        mean, _ = model.vae.encode(x)
        assert mean.shape == (1, 4, *hw)
        assert max_diff(mean, ref.encode(x).latent_dist.mean) <= TOL
        decoded = model.vae.decode(mean)
        assert decoded.shape == x.shape
        assert max_diff(decoded, ref.decode(mean).sample) <= TOL


@pytest.mark.parametrize(("hw", "tile"), [((13, 21), 6), ((3, 17), 4), ((9, 2), 4), ((5, 5), 5)])
def test_tiled_decode_of_odd_latents_covers_every_pixel(hw, tile):
    model = random_model("tiny")
    z = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = tiled_decode(model.vae.decode, z, tile, max(1, tile // 4), 8)
        whole = model.vae.decode(z)
    assert out.shape == whole.shape == (1, 3, hw[0] * 8, hw[1] * 8)
    assert torch.isfinite(out).all()
    # tiles blend into each other: close to the whole decode on average (equal where one tile covers all)
    assert (out - whole).abs().mean() < 0.5


# ----------------------------------------------------------------------------------------------------
# whole pipelines: diffusers parity off the multiples of 64, and the demo model at tiny sizes

W, H = 24, 40  # latents 3 x 5: odd, so a 2x upsampling overshoots the skip connection


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None] * rng.uniform(0, 255, (1, 1, 3))
    y = np.linspace(0, 1, height)[:, None, None] * rng.uniform(0, 255, (1, 1, 3))
    return Image.fromarray(np.clip(x + y * 0.5, 0, 255).astype(np.uint8), "RGB")


def right_half(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask, "L")


def test_txt2img_at_odd_latent_size_matches_diffusers():
    pipe = ours()
    prompts, seeds = ["a red circle", "a photo of a cat"], [3, 42]
    pairs = zip(prompts, seeds, strict=True)
    mine = pipe.render([request(p, seed=s, steps=4, cfg=5.0, sampler="euler", width=W, height=H) for p, s in pairs])
    assert all(r.ok and r.image.size == (W, H) for r in mine)
    ref = theirs(StableDiffusionPipeline, pipe, "euler")(
        prompt=prompts,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        height=H,
        width=W,
        output_type="np",
    ).images
    assert_close(pixels([r.image for r in mine]), ref * 255)


@pytest.mark.parametrize("config", ["tiny", "tiny-inpainting"])
def test_inpainting_at_odd_latent_size_matches_diffusers(config):
    pipe = ours(config)
    init, mask = gradient(W, H), right_half(W, H)
    mine = pipe.render(
        [
            request(
                "a cat",
                seed=5,
                steps=5,
                cfg=7.5,
                sampler="euler_a",
                width=W,
                height=H,
                init_image=init,
                mask=mask,
                strength=0.8,
            )
        ]
    )
    ref = theirs(StableDiffusionInpaintPipeline, pipe, "euler_a")(
        prompt=["a cat"],
        image=[init],
        mask_image=[mask],
        strength=0.8,
        num_inference_steps=5,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(5)],
        height=H,
        width=W,
        output_type="np",
    ).images
    assert_close(pixels([r.image for r in mine]), ref * 255)


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return Pipeline.from_file("demo")


# the demo model's latents are 1/4 of the image and its UNet halves them twice: every one of these
# sizes failed (8 px = 2 cells -> 1 -> 1, back up to 2 against a skip of 1)
DEMO_SIZES = [(8, 8), (24, 40), (40, 24), (8, 64), (520, 72)]


@pytest.mark.parametrize("size", DEMO_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_demo_model_renders_every_multiple_of_8(demo, size, mode):
    w, h = size
    images = {}
    if mode != "txt2img":
        images = {"init_image": gradient(w, h), "strength": 0.7}
    if mode == "inpaint":
        images["mask"] = right_half(w, h)
    results = demo.render(
        [request("a big red circle on a blue background", seed=s, steps=2, width=w, height=h, **images) for s in (1, 2)]
    )
    for r in results:
        assert r.ok, r.error
        assert r.image.size == (w, h)
        assert r.latents.shape == (4, h // 4, w // 4)
        assert torch.isfinite(r.latents).all()
    if mode == "inpaint":  # the unmasked latents are the init image's, exactly, whatever the size
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            mean, logvar = demo.model.vae.encode(image_tensor(images["init_image"], w, h))
            sample = mean + (0.5 * logvar).exp() * torch.randn((1, 4, h // 4, w // 4), generator=g)
        known = sample[0] * demo.model.config.vae.scale_factor
        keep = F.interpolate(mask_tensor(images["mask"], w, h), size=(h // 4, w // 4))[0] < 0.5
        assert keep.any()
        assert torch.allclose(results[0].latents * keep, known * keep, atol=1e-5)


def test_demo_tiled_decode_at_an_odd_latent_size(demo):
    tiled = Pipeline(demo.model, demo.tokenizer, tuning=Tuning(vae_tile=8))
    r = tiled.render([request("a big red circle on a blue background", seed=3, steps=2, width=520, height=72)])[0]
    assert r.ok and r.image.size == (520, 72)


def test_a_size_the_vae_cannot_represent_is_refused_before_rendering(monkeypatch):
    # a VAE of factor 16 cannot give a 24 px side: refused up front, the UNet is never called
    cfg = replace(CONFIGS["tiny"], vae=VAEConfig(ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, norm_groups=8))
    pipe = Pipeline(random_model(cfg), Tokenizer(bundled_tokenizer(), "bundled"))
    calls = []
    monkeypatch.setattr(pipe, "_unet", lambda *a: calls.append(a))
    with pytest.raises(RequestError, match="multiple of 16"):
        pipe.render([request("a cat", seed=1, steps=2, width=24, height=48)])
    assert not calls


@pytest.mark.slow
def test_a_job_of_mixed_sizes_renders_every_image(tmp_path):
    """The issue's job: one size that failed must not leave the others half rendered."""
    sizes = [[8, 8], [24, 40], [520, 72], [32, 32]]
    (tmp_path / "job.yaml").write_text(
        f"name: sizes\ndefaults:\n  steps: 2\nruns:\n  - prompt: a red circle\n    seed: 1\n    size: {sizes}\n"
    )
    root = str(Path(__file__).resolve().parent.parent)  # this tree's sdbatch, whatever is installed
    done = subprocess.run(
        [sys.executable, "-m", "sdbatch", "run", "job.yaml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs" / "sizes"
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["size"] for e in entries) == sorted(sizes)
    assert all(e["status"] == "ok" for e in entries)
    for e in entries:
        with Image.open(out / e["file"]) as im:
            assert list(im.size) == e["size"]


def test_a_model_that_cannot_render_every_multiple_of_8_is_refused_as_a_config():
    """The recipe promises every multiple of 8; a VAE shrinking by more than 8 could not keep that
    promise, so such a config is refused when the model is read (validate, plan, run), never
    halfway through a job."""
    from dataclasses import replace

    from sdbatch.models.configs import config_problems, get_config

    for name in ("sd15", "demo"):
        assert config_problems(get_config(name)) == []
    sd = get_config("sd15")
    deep = replace(sd, vae=replace(sd.vae, ch_mult=(1, 2, 4, 4, 4)))
    assert any("vae.ch_mult" in p for p in config_problems(deep))
