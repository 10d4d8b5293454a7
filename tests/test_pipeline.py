"""The pipeline against diffusers' pipelines, and the promises of its own: batch independence,
inpainting that keeps what is not masked, no silent prompt truncation, failures reported per image."""

import numpy as np
import pytest
import torch
from conftest import make_tiny
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from helpers import TEST_DEVICE, diffusers_scheduler, request
from PIL import Image
from test_models import carried

from sdbatch.errors import InputError
from sdbatch.pipeline import Pipeline, Request, RequestError, image_tensor, mask_tensor, to_rgb
from sdbatch.recipe import Recipe, RecipeError
from sdbatch.tokenizer import Tokenizer, bundled_tokenizer

W, H = 64, 48  # not square on purpose: latents 8 x 6
PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a small green triangle"]
SEEDS = [3, 1234567, 42]


def ours(config: str = "tiny", dtype=torch.float32) -> Pipeline:
    return Pipeline(make_tiny(config), Tokenizer(bundled_tokenizer(), "bundled"), TEST_DEVICE, dtype)


def theirs(kind, pipeline: Pipeline, sampler: str):
    model = pipeline.model
    return kind(
        vae=carried(model, "vae"),
        text_encoder=carried(model, "text_encoder"),
        tokenizer=bundled_tokenizer(),
        unet=carried(model, "unet"),
        scheduler=diffusers_scheduler(sampler, False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(TEST_DEVICE)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float64) for i in images])


def gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def gradient_image(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, W)[None, :, None] * rng.uniform(0, 255, (1, 1, 3))
    y = np.linspace(0, 1, H)[:, None, None] * rng.uniform(0, 255, (1, 1, 3))
    return Image.fromarray(np.clip(x + y * 0.5, 0, 255).astype(np.uint8), "RGB").convert(mode)


def half_mask(left: bool = False) -> Image.Image:
    mask = np.zeros((H, W), np.uint8)
    if left:
        mask[:, : W // 2] = 255
    else:
        mask[:, W // 2 :] = 255
    return Image.fromarray(mask, "L")


def assert_close(a: np.ndarray, b: np.ndarray, tol: float = 2.0) -> None:
    assert a.shape == b.shape
    worst = np.abs(a - b).max()
    assert worst <= tol, f"max pixel difference {worst} > {tol}"


# ----------------------------------------------------------------------------------------------------
# parity with diffusers


# DDPM is proven against diffusers' scheduler in test_samplers: diffusers' SD pipelines force
# steps_offset=1 on it, while ours keeps the seed's timesteps (980, ..., 0)
@pytest.mark.parametrize(("sampler", "cfg"), [("euler_a", 7.5), ("dpmpp_2m", 5.0), ("ddim", 1.0), ("euler", 3.0)])
def test_txt2img_matches_diffusers(sampler, cfg):
    pipe = ours()
    requests = [
        request(p, seed=s, steps=6, sampler=sampler, cfg=cfg, width=W, height=H)
        for p, s in zip(PROMPTS, SEEDS, strict=True)
    ]
    mine = pixels([r.image for r in pipe.render(requests)])
    ref = theirs(StableDiffusionPipeline, pipe, sampler)(
        prompt=PROMPTS, num_inference_steps=6, guidance_scale=cfg, generator=gens(), height=H, width=W, output_type="np"
    ).images
    assert_close(mine, ref * 255)


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 0.75), ("ddim", 0.3), ("euler_a", 0.6)])
def test_img2img_matches_diffusers(sampler, strength):
    pipe = ours()
    inits = [gradient_image(s) for s in SEEDS]
    requests = [
        request(p, seed=s, steps=8, sampler=sampler, cfg=6.0, width=W, height=H, init_image=i, strength=strength)
        for p, s, i in zip(PROMPTS, SEEDS, inits, strict=True)
    ]
    mine = pixels([r.image for r in pipe.render(requests)])
    ref = theirs(StableDiffusionImg2ImgPipeline, pipe, sampler)(
        prompt=PROMPTS,
        image=inits,
        strength=strength,
        num_inference_steps=8,
        guidance_scale=6.0,
        generator=gens(),
        output_type="np",
    ).images
    assert_close(mine, ref * 255)


@pytest.mark.parametrize(
    ("config", "sampler", "strength"),
    [
        ("tiny", "euler_a", 1.0),
        ("tiny", "dpmpp_2m", 0.7),
        ("tiny-inpainting", "euler_a", 1.0),
        ("tiny-inpainting", "ddim", 0.6),
    ],
)
def test_inpaint_matches_diffusers(config, sampler, strength):
    pipe = ours(config)
    inits = [gradient_image(s) for s in SEEDS]
    masks = [half_mask(left=bool(k % 2)) for k in range(len(SEEDS))]
    requests = [
        request(
            p, seed=s, steps=7, sampler=sampler, cfg=7.5, width=W, height=H, init_image=i, mask=m, strength=strength
        )
        for p, s, i, m in zip(PROMPTS, SEEDS, inits, masks, strict=True)
    ]
    mine = pixels([r.image for r in pipe.render(requests)])
    ref = theirs(StableDiffusionInpaintPipeline, pipe, sampler)(
        prompt=PROMPTS,
        image=inits,
        mask_image=masks,
        strength=strength,
        num_inference_steps=7,
        guidance_scale=7.5,
        generator=gens(),
        height=H,
        width=W,
        output_type="np",
    ).images
    assert_close(mine, ref * 255)


# ----------------------------------------------------------------------------------------------------
# determinism


def mixed_requests() -> list[Request]:
    long_prompt = ", ".join(f"detail number {k}" for k in range(40))  # about 120 tokens: two windows
    return [
        request("a red circle", seed=1, steps=5, cfg=7.5, width=W, height=H),
        request("a red circle", seed=2, steps=5, cfg=3.0, width=W, height=H),
        request("a blue square", negative="blurry", seed=1, steps=5, cfg=1.0, width=W, height=H),
        request(long_prompt, seed=7, steps=5, cfg=9.0, width=W, height=H),
        request("a green triangle", negative=long_prompt, seed=2**63 + 5, steps=5, cfg=5.0, width=W, height=H),
        request("", seed=99, steps=5, cfg=7.5, width=W, height=H),
    ]


def test_batch_and_single_renders_are_the_same():
    pipe = ours()
    requests = mixed_requests()
    batched = pipe.render(requests)
    alone = [pipe.render([r])[0] for r in requests]
    assert all(r.ok for r in batched + alone)
    assert_close(pixels([r.image for r in batched]), pixels([r.image for r in alone]), tol=1.0)
    shuffled = pipe.render(requests[::-1])[::-1]
    assert_close(pixels([r.image for r in batched]), pixels([r.image for r in shuffled]), tol=1.0)
    # and the requests really differ from each other
    assert len({r.image.tobytes() for r in batched}) == len(requests)


def test_two_runs_give_identical_pixels():
    first = ours().render(mixed_requests())
    second = ours().render(mixed_requests())
    assert [r.image.tobytes() for r in first] == [r.image.tobytes() for r in second]


def test_seed_changes_the_image_and_only_the_seed_matters():
    pipe = ours()
    a, b = pipe.render(
        [request("a cat", seed=1, steps=4, width=W, height=H), request("a cat", seed=2, steps=4, width=W, height=H)]
    )
    assert a.image.tobytes() != b.image.tobytes()
    again = pipe.render(
        [request("a dog", seed=5, steps=4, width=W, height=H), request("a cat", seed=1, steps=4, width=W, height=H)]
    )
    assert again[1].image.tobytes() == a.image.tobytes()


# ----------------------------------------------------------------------------------------------------
# inpainting keeps the unmasked region


def test_inpainting_with_a_normal_model_keeps_the_known_latents():
    pipe = ours()
    init, mask = gradient_image(5), half_mask()
    for strength in (1.0, 0.5):
        result = pipe.render(
            [
                request(
                    "a cat",
                    seed=8,
                    steps=6,
                    sampler="euler",
                    width=W,
                    height=H,
                    init_image=init,
                    mask=mask,
                    strength=strength,
                )
            ]
        )[0]
        # the known latents: the VAE's sample of the init image with the request's first draw
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            mean, logvar = (t.cpu() for t in pipe.model.vae.encode(image_tensor(init, W, H).to(TEST_DEVICE)))
            known = (mean + (0.5 * logvar).exp() * torch.randn((1, 4, H // 8, W // 8), generator=g)) * 0.18215
        keep = torch.nn.functional.interpolate(mask_tensor(mask, W, H), size=(H // 8, W // 8)) < 0.5
        outside = result.latents[None][keep.expand(1, 4, -1, -1)]
        assert torch.allclose(outside, known[keep.expand(1, 4, -1, -1)], atol=1e-5)
        inside = result.latents[None][~keep.expand(1, 4, -1, -1)]
        assert not torch.allclose(inside, known[~keep.expand(1, 4, -1, -1)], atol=1e-2)


# ----------------------------------------------------------------------------------------------------
# prompts


def test_long_prompt_is_encoded_whole_not_cut():
    pipe = ours()
    words = " ".join(f"word{k}" for k in range(90))
    windows = pipe.token_windows(words)
    tokens = pipe.tokenizer.tokens(words)
    count = -(-len(tokens) // 75)
    assert count >= 2
    assert windows.shape == (count, 77)
    assert windows[:, 0].tolist() == [49406] * count
    inside = windows[:, 1:76].flatten().tolist()
    assert inside[: len(tokens)] == tokens  # every token, in order, none dropped
    assert windows[-1, 1 + len(tokens) - 75 * (count - 1)] == 49407
    embedding = pipe.encode_prompt(words)
    assert embedding.shape == (1, 77 * count, 32)
    with torch.no_grad():
        assert torch.equal(embedding[0, 77:154], pipe.model.text_encoder(windows[1:2].to(TEST_DEVICE))[0])
    short = pipe.encode_prompt("a cat")
    assert short.shape == (1, 77, 32)
    assert pipe.encode_prompt("a cat") is short  # cached


# ----------------------------------------------------------------------------------------------------
# images in, errors out


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "CMYK"])
def test_init_images_in_any_mode_are_converted(mode):
    image = gradient_image(2, "RGB")
    if mode == "I;16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey)  # uint16: Pillow makes it an I;16 image
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (W, H)
    if mode in ("L", "I;16"):  # same grey levels, not clipped to white
        assert (
            np.abs(np.asarray(rgb.convert("L"), np.int16) - np.asarray(gradient_image(2).convert("L"), np.int16)).max()
            <= 1
        )
    result = ours().render([request("a cat", seed=1, steps=3, width=W, height=H, init_image=image, strength=0.5)])[0]
    assert result.ok


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (W, H), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255


def test_init_image_of_the_same_shape_is_resized_another_shape_refused():
    big = gradient_image(1).resize((W * 2, H * 2))
    assert image_tensor(big, W, H).shape == (1, 3, H, W)
    with pytest.raises(InputError, match=r"init_image is 64x64 but the size asked for is 64x48: the aspect ratios"):
        image_tensor(Image.new("RGB", (64, 64)), W, H)
    with pytest.raises(InputError, match=r"mask is 64x64"):
        mask_tensor(Image.new("L", (64, 64)), W, H)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (500, 64)}, "size: 500x64: each side must be a multiple of 8"),
        ({"size": (64, 0)}, "size: 64x0: each side must be a multiple of 8"),
        ({"steps": 0}, "steps: 0 is out of range: must be from 1 to 1000"),
        ({"sampler": "nonesuch"}, "unknown sampler 'nonesuch'"),
        ({"sampler": "ddpm", "karras": True}, "karras does not apply to ddpm"),
        ({"init_image": "a.png", "strength": 1.5}, r"strength: 1.5 is out of range: must be above 0 and at most 1"),
        ({"mask": "m.png"}, "a mask needs an init_image"),
        ({"init_image": "a.png", "strength": 0.01}, "runs no step at all"),
        ({"seed": -1}, r"seed: -1 is out of range"),
        ({"strength": 0.5}, "strength: applies to images with an init_image"),
    ],
)
def test_bad_recipes_are_refused(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        Recipe("a cat", **kwargs).check()


def test_a_request_needs_the_images_its_recipe_names():
    with pytest.raises(RequestError, match="init_image"):
        Request(Recipe("a cat", init_image="a.png", strength=0.5))


def test_incompatible_batch_is_refused():
    with pytest.raises(RequestError, match="a batch must share"):
        ours().render([request("a", steps=4, width=W, height=H), request("b", steps=5, width=W, height=H)])


def test_nan_latents_fail_that_image_only(monkeypatch):
    pipe = ours()
    unet_forward = pipe.model.unet.forward

    def poisoned(x, t, context):
        out = unet_forward(x, t, context)
        out[0] = float("nan")  # the first row: the first request's cond
        return out

    monkeypatch.setattr(pipe.model.unet, "forward", poisoned)
    results = pipe.render(
        [
            request("a", seed=1, steps=3, cfg=1, width=W, height=H),
            request("b", seed=2, steps=3, cfg=1, width=W, height=H),
        ]
    )
    assert not results[0].ok and results[0].error == "NaN or inf in the latents after sampling"
    assert results[1].ok and results[1].error is None


def test_fp16_vae_overflow_is_decoded_again_in_fp32(monkeypatch):
    pipe = ours(dtype=torch.bfloat16)
    vae = pipe.model.vae
    decode = vae.decode
    calls = []

    def overflowing(z):
        calls.append(z.dtype)
        out = decode(z)
        return out if z.dtype == torch.float32 else torch.full_like(out, float("inf"))

    monkeypatch.setattr(vae, "decode", overflowing)
    result = pipe.render([request("a cat", seed=1, steps=3, width=W, height=H)])[0]
    assert result.ok
    assert calls == [torch.bfloat16, torch.float32]
    assert next(vae.parameters()).dtype == torch.bfloat16  # given back its dtype


def test_the_fp32_vae_fallback_keeps_the_tiles_and_the_vae_batch(monkeypatch):
    """A half decode that overflows is decoded again in fp32 the way the first try was: in tiles (a
    big picture is tiled on every device, and an untiled fallback would give another picture, or run
    out of memory) and vae_batch images at a time, never the whole batch at once."""
    from sdbatch.pipeline import Tuning

    tuning = Tuning(vae_tile=4, vae_batch=1)
    pipe = Pipeline(make_tiny(), Tokenizer(bundled_tokenizer(), "bundled"), TEST_DEVICE, torch.bfloat16, tuning)
    vae = pipe.model.vae
    decode = vae.decode
    calls = []

    def overflowing(z):
        calls.append((z.dtype, tuple(z.shape)))
        out = decode(z)
        return out if z.dtype == torch.float32 else torch.full_like(out, float("inf"))

    monkeypatch.setattr(vae, "decode", overflowing)
    requests = [request("a cat", seed=s, steps=2, width=W, height=H) for s in (1, 2)]
    assert all(r.ok for r in pipe.render(requests))
    fallback = [shape for dtype, shape in calls if dtype == torch.float32]
    assert fallback and len(fallback) == len([c for c in calls if c[0] == torch.bfloat16])
    assert all(shape[0] == 1 and max(shape[2:]) < max(H, W) // 8 for shape in fallback), fallback


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_renders_close_to_fp32(dtype):
    req = request("a red circle", seed=4, steps=4, width=W, height=H)
    full = pixels([ours().render([req])[0].image])
    half = ours(dtype=dtype).render([req])[0]
    assert half.ok
    assert {p.dtype for p in ours(dtype=dtype).model.parameters()} == {dtype}
    assert np.abs(pixels([half.image]) - full).mean() < 12


def test_cfg_1_skips_the_unconditional_rows(monkeypatch):
    pipe = ours()
    forward = pipe.model.unet.forward
    rows = []

    def counting(x, t, context):
        rows.append(x.shape[0])
        return forward(x, t, context)

    monkeypatch.setattr(pipe.model.unet, "forward", counting)
    pipe.render(
        [
            request("a", seed=1, steps=2, cfg=1.0, width=W, height=H),
            request("b", seed=2, steps=2, cfg=7.0, width=W, height=H),
        ]
    )
    assert rows == [3, 3]  # one row for the CFG-1 request, two (cond + uncond) for the other, one call per step
