"""Speed options give the default path's images (within float rounding), on tiny random models."""

import numpy as np
import pytest
from conftest import make_tiny
from helpers import request
from test_pipeline import gradient_image, half_mask

from sdbatch.pipeline import Pipeline, Request, Tuning
from sdbatch.tokenizer import Tokenizer, bundled_tokenizer


def pipe(fast: Tuning | None = None, config: str = "tiny") -> Pipeline:
    return Pipeline(make_tiny(config), Tokenizer(bundled_tokenizer(), "bundled"), tuning=fast or Tuning())


def requests() -> list[Request]:
    return [
        request("a red circle", seed=s, steps=4, cfg=c, width=64, height=48) for s, c in ((1, 7.5), (2, 1.0), (3, 4))
    ]


def img2img() -> list[Request]:
    init = gradient_image(0).resize((64, 48))
    mask = half_mask().resize((64, 48))
    return [
        request("a cat", seed=5, steps=6, width=64, height=48, init_image=init, strength=0.6),
        request("a dog", seed=6, steps=6, width=64, height=48, init_image=init, strength=0.6),
    ], [request("a dog", seed=7, steps=6, width=64, height=48, init_image=init, mask=mask, strength=0.8)]


def pixels(p: Pipeline, reqs: list[Request]) -> np.ndarray:
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in p.render(reqs)])


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    p = pipe()
    i2i, inpaint = img2img()
    return {"txt2img": pixels(p, requests()), "img2img": pixels(p, i2i), "inpaint": pixels(p, inpaint)}


@pytest.mark.parametrize(
    "fast",
    [
        Tuning(channels_last=True),
        Tuning(vae_batch=1),
        Tuning(low_vram=True),
        Tuning(True, False, False, 2, True),
    ],
    ids=["channels_last", "vae_batch", "low_vram", "all"],
)
def test_fast_path_options_keep_the_images(reference, fast):
    p = pipe(fast)
    i2i, inpaint = img2img()
    for name, got in (("txt2img", pixels(p, requests())), ("img2img", pixels(p, i2i)), ("inpaint", pixels(p, inpaint))):
        assert np.abs(got - reference[name]).max() <= 1, name


def test_compile_works_on_cpu_and_is_reused(reference):
    p = pipe(Tuning(compile=True))
    got = pixels(p, requests())
    assert np.abs(got - reference["txt2img"]).max() <= 2
    shapes = dict(p.compile_seconds)
    assert len(shapes) >= 1 and all(s > 0 for s in shapes.values())
    pixels(p, requests())  # same shapes: compiled graphs reused, nothing compiled again
    assert p.compile_seconds == shapes


def test_tiled_vae_decode_is_as_faithful_as_a_whole_decode():
    """Tiling may change pixels (each tile's attention sees only itself), so it is held to the
    original image: the trained demo VAE reconstructs 64, 88 and 96 px images tile by tile (32 px
    tiles, the size it was trained at) about as well as in one piece."""
    import torch

    from sdbatch.demo import data
    from sdbatch.pipeline import image_tensor, tiled_decode

    vae = Pipeline.from_file("demo").model.vae
    for side in (64, 88, 96):  # 88: the last tiles are partial
        x = image_tensor(data.Scene("circle", "red", "blue", "big", "in the middle").render(side), side, side)
        with torch.no_grad():
            z = vae.encode(x)[0]
            whole, tiled = vae.decode(z), tiled_decode(vae.decode, z, 8, 2, 4)
            one_tile = tiled_decode(vae.decode, z, z.shape[-1], 2, 4)
        assert tiled.shape == whole.shape
        assert torch.equal(one_tile, whole)
        err_whole = (whole.clamp(-1, 1) - x).abs().mean() * 127.5
        err_tiled = (tiled.clamp(-1, 1) - x).abs().mean() * 127.5
        assert err_tiled < err_whole + 3, (side, float(err_tiled), float(err_whole))


def test_pipeline_uses_tiles_only_when_latents_are_larger():
    p_tiled, p_whole = pipe(Tuning(vae_tile=4)), pipe()
    small = [request("a cat", seed=1, steps=2, width=32, height=32)]  # 4x4 latents: one tile, unchanged
    assert np.array_equal(pixels(p_tiled, small), pixels(p_whole, small))
    big = [request("a cat", seed=1, steps=2, width=64, height=48)]
    assert pixels(p_tiled, big).shape == pixels(p_whole, big).shape == (1, 48, 64, 3)
