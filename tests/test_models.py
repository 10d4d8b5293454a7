"""Our networks against independent implementations, with the same weights carried by our converter."""

import pytest
import torch
from conftest import make_tiny
from helpers import diffusers_unet, diffusers_vae, for_twin, max_diff, shake_norms, transformers_clip

from sdbatch.convert import to_diffusers
from sdbatch.models import CONFIGS, build_model

TOL = 1e-4


def carried(model, component: str):
    """The diffusers/transformers twin of one of our components, holding our weights."""
    cfg = model.config
    twin = {"unet": diffusers_unet, "vae": diffusers_vae, "text_encoder": transformers_clip}[component](cfg)
    twin.load_state_dict(for_twin(twin, to_diffusers(model.state_dict(), cfg)[component]), strict=True)
    return twin.eval()


def test_clip_matches_transformers():
    model = make_tiny()
    ref = carried(model, "text_encoder")
    ids = torch.randint(0, 49408, (3, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 49406
    ids[0, 10:] = 49407  # a padded prompt, as the pipeline feeds it
    with torch.no_grad():
        ours = model.text_encoder(ids)
        theirs = ref(input_ids=ids).last_hidden_state
    assert ours.shape == (3, 77, 32)
    assert max_diff(ours, theirs) <= TOL


def test_clip_shorter_sequences_match_transformers():
    model = make_tiny()
    ref = carried(model, "text_encoder")
    ids = torch.randint(0, 49408, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(model.text_encoder(ids), ref(input_ids=ids).last_hidden_state) <= TOL


def test_vae_encode_decode_match_diffusers():
    model = make_tiny()
    ref = carried(model, "vae")
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1  # non-square on purpose
    with torch.no_grad():
        mean, logvar = model.vae.encode(x)
        dist = ref.encode(x).latent_dist
        assert mean.shape == (2, 4, 4, 6)
        assert max_diff(mean, dist.mean) <= TOL
        assert max_diff(logvar, dist.logvar) <= TOL
        z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(4))  # decode: any latent size
        assert max_diff(model.vae.decode(z), ref.decode(z).sample) <= TOL


@pytest.mark.parametrize("config", ["tiny", "tiny-inpainting"])
def test_unet_matches_diffusers(config):
    model = make_tiny(config)
    ref = carried(model, "unet")
    g = torch.Generator().manual_seed(5)
    channels = model.config.unet.in_channels
    x = torch.randn(3, channels, 16, 24, generator=g)
    t = torch.tensor([1, 500, 999])
    context = torch.randn(3, 77, 32, generator=g)
    with torch.no_grad():
        ours = model.unet(x, t, context)
        theirs = ref(x, t, encoder_hidden_states=context).sample
    assert ours.shape == (3, 4, 16, 24)
    assert max_diff(ours, theirs) <= TOL


def test_sd15_sizes_on_meta_device():
    model = build_model("sd15", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    assert count(model.unet) == 859_520_964
    assert count(model.vae.encoder, model.vae.quant_conv) == 34_163_664
    assert count(model.vae.decoder, model.vae.post_quant_conv) == 49_490_199
    assert count(model.text_encoder) == 123_060_480
    assert count(build_model("sd15-inpainting", device="meta").unet) == 859_520_964 + 5 * 320 * 9


def test_sd15_keys_convert_with_diffusers_own_functions():
    """diffusers' single-file converter turns our key set into exactly its SD1.5 models' key set."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    cfg = CONFIGS["sd15"]
    checkpoint = build_model(cfg, device="meta").state_dict()
    with torch.device("meta"):
        unet, vae, clip = diffusers_unet(cfg), diffusers_vae(cfg), transformers_clip(cfg)
    converted = {
        "unet": convert_ldm_unet_checkpoint(dict(checkpoint), unet.config),
        "vae": convert_ldm_vae_checkpoint(dict(checkpoint), vae.config),
        "clip": convert_ldm_clip_checkpoint(dict(checkpoint)),
    }
    for name, twin in (("unet", unet), ("vae", vae), ("clip", clip)):
        want = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in for_twin(twin, converted[name]).items()}
        assert got == want, name
    assert len(checkpoint) == 686 + 248 + 196


@pytest.mark.slow
def test_sd15_full_size_parity_with_diffusers():
    """The real architecture (not only the tiny one) matches, at a small spatial size."""
    torch.manual_seed(0)
    model = build_model("sd15").eval().requires_grad_(False)
    shake_norms(model, 0)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        unet = carried(model, "unet")
        x, t, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([321]), torch.randn(1, 77, 768, generator=g)
        assert max_diff(model.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample) <= TOL
        del unet
        clip = carried(model, "text_encoder")
        ids = torch.randint(0, 49408, (1, 77), generator=g)
        assert max_diff(model.text_encoder(ids), clip(input_ids=ids).last_hidden_state) <= TOL
        del clip
        vae = carried(model, "vae")
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert max_diff(model.vae.decode(z), vae.decode(z).sample) <= TOL
        img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert max_diff(model.vae.encode(img)[0], vae.encode(img).latent_dist.mean) <= TOL
