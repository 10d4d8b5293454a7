"""Loading weights people really have, and refusing the rest with a message that says why."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from helpers import diffusers_unet, diffusers_vae, max_diff, shake_norms, transformers_clip
from safetensors import safe_open
from safetensors.torch import save_file

from sdbatch.checkpoints import (
    CheckpointError,
    TensorRef,
    check_tensors,
    detect_kind,
    file_sha256,
    load_model,
    model_hash,
    model_sha256,
    read_weights,
    save_checkpoint,
)
from sdbatch.models import CONFIGS, build_model
from sdbatch.tokenizer import bundled_tokenizer, load_tokenizer

TINY = CONFIGS["tiny"]


def outputs(model) -> list[torch.Tensor]:
    """One forward of each network on fixed inputs."""
    g = torch.Generator().manual_seed(42)
    x = torch.randn(1, model.config.unet.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.config.unet.context_dim, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        return [
            model.unet(x, torch.tensor([250]), ctx),
            model.vae.decode(x[:, :4]),
            model.vae.encode(img)[0],
            model.text_encoder(ids),
        ]


def assert_same_outputs(a, b):
    for x, y in zip(outputs(a), outputs(b), strict=True):
        assert torch.equal(x, y)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# round trips


def test_safetensors_round_trip_is_identical_and_carries_its_config(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    loaded = load_model(path)  # no config given: read from the file's header
    assert loaded.config == TINY
    assert loaded.kind.name == "sd1"
    assert_same_outputs(tiny, loaded.model)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_round_trip_with_and_without_state_dict_wrapper(tmp_path, tiny, wrapped):
    path = tmp_path / "m.ckpt"
    if wrapped:
        save_checkpoint(tiny, path)
    else:
        torch.save(state(tiny), path)
    assert ("state_dict" in torch.load(path, weights_only=True)) == wrapped
    assert_same_outputs(tiny, load_model(path, config="tiny").model)


def test_ema_schedule_and_position_id_keys_are_ignored(tmp_path, tiny):
    sd = state(tiny)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    sd["betas"] = torch.linspace(0, 1, 1000)
    # merged files often carry a float, slightly wrong copy: ignoring it is what keeps them correct
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.3
    save_file(sd, tmp_path / "m.safetensors")
    assert_same_outputs(tiny, load_model(tmp_path / "m.safetensors", config="tiny").model)


@pytest.mark.parametrize(("dtype", "suffix"), [(torch.float16, ".safetensors"), (torch.bfloat16, ".ckpt")])
def test_half_precision_files_load(tmp_path, tiny, dtype, suffix):
    half = {k: v.to(dtype) for k, v in state(tiny).items()}
    path = tmp_path / f"m{suffix}"
    save_file(half, path) if suffix == ".safetensors" else torch.save({"state_dict": half}, path)
    loaded = load_model(path, config="tiny").model
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, half[key].float()), key
    as_half = load_model(path, config="tiny", dtype=dtype).model
    assert {p.dtype for p in as_half.parameters()} == {dtype}


def test_inpainting_checkpoint_is_detected_and_loads(tmp_path):
    model = make_tiny("tiny-inpainting")
    path = save_checkpoint(model, tmp_path / "inpaint.safetensors")
    loaded = load_model(path)
    assert loaded.kind.name == "sd1-inpainting"
    assert loaded.config.unet.in_channels == 9
    assert_same_outputs(model, loaded.model)


def test_a_real_sd15_key_set_passes_the_checks():
    """The full SD1.5 key set with the extras real files carry is accepted (checked on shapes only)."""
    shapes = {k: tuple(v.shape) for k, v in build_model("sd15", device="meta").state_dict().items()}
    view = {k: TensorRef(s, torch.empty) for k, s in shapes.items()}
    view["cond_stage_model.transformer.text_model.embeddings.position_ids"] = TensorRef((1, 77), torch.empty)
    view["model_ema.num_updates"] = TensorRef((), torch.empty)
    view["alphas_cumprod"] = TensorRef((1000,), torch.empty)
    check_tensors(view, CONFIGS["sd15"], Path("v1-5-pruned.ckpt"))
    assert detect_kind({k: r.shape for k, r in view.items()}).name == "sd1"
    inpaint = {k: tuple(v.shape) for k, v in build_model("sd15-inpainting", device="meta").state_dict().items()}
    assert detect_kind(inpaint).name == "sd1-inpainting"


# ----------------------------------------------------------------------------------------------------
# diffusers folders


def diffusers_folder(root: Path, legacy: bool = False) -> tuple[Path, dict]:
    """A diffusers SD folder saved by diffusers/transformers themselves, with their own random weights."""
    torch.manual_seed(7)
    parts = {"unet": diffusers_unet(TINY), "vae": diffusers_vae(TINY), "text_encoder": transformers_clip(TINY)}
    for name, part in parts.items():
        shake_norms(part, 3)
        part.eval().save_pretrained(root / name)
    bundled_tokenizer().save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if legacy:  # the layouts older diffusers / transformers wrote, as found in many downloaded folders
        _rewrite(root / "vae" / "diffusion_pytorch_model.safetensors", _legacy_vae_name)
        _rewrite(root / "text_encoder" / "model.safetensors", lambda k: "text_model." + k)
    return root, parts


def _legacy_vae_name(key: str) -> str:
    for new, old in {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}.items():
        key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    return key


def _rewrite(path: Path, rename) -> None:
    with safe_open(str(path), "pt") as f:
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, path)


@pytest.mark.parametrize("legacy", [False, True])
def test_diffusers_folder_loads_and_matches_diffusers(tmp_path, legacy):
    folder, parts = diffusers_folder(tmp_path / "sd", legacy)
    loaded = load_model(folder)
    model = loaded.model
    assert loaded.config.unet == TINY.unet and loaded.config.vae == TINY.vae and loaded.config.clip == TINY.clip
    g = torch.Generator().manual_seed(8)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        assert max_diff(model.unet(x, t, ctx), parts["unet"](x, t, encoder_hidden_states=ctx).sample) <= 1e-4
        assert max_diff(model.vae.decode(x), parts["vae"].decode(x).sample) <= 1e-4
        assert max_diff(model.vae.encode(img)[0], parts["vae"].encode(img).latent_dist.mean) <= 1e-4
        assert max_diff(model.text_encoder(ids), parts["text_encoder"](input_ids=ids).last_hidden_state) <= 1e-4
    assert load_tokenizer(folder).source == str(folder / "tokenizer")


def test_sdxl_diffusers_folder_is_refused(tmp_path):
    folder, _ = diffusers_folder(tmp_path / "xl")
    (folder / "text_encoder_2").mkdir()
    with pytest.raises(CheckpointError, match="SDXL"):
        load_model(folder)


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers model"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------------------------------
# separate VAE


def vae_only(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in model.vae.state_dict().items()}


def test_vae_override_from_an_ldm_vae_file(tmp_path):
    base, other = make_tiny(seed=1), make_tiny(seed=2)
    path = save_checkpoint(base, tmp_path / "base.safetensors")
    save_file(vae_only(other), tmp_path / "vae.safetensors")  # like vae-ft-mse-840000: no prefix
    loaded = load_model(path, vae=tmp_path / "vae.safetensors")
    assert loaded.vae_path == tmp_path / "vae.safetensors"
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.model.vae.state_dict().values(), vae_only(other).values(), strict=True)
    )
    assert torch.equal(outputs(loaded.model)[0], outputs(base)[0])  # the UNet is still the base model's


def test_vae_override_from_a_diffusers_vae_folder(tmp_path):
    folder, parts = diffusers_folder(tmp_path / "sd")
    path = save_checkpoint(make_tiny(), tmp_path / "base.safetensors")
    model = load_model(path, vae=folder / "vae").model
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert max_diff(model.vae.decode(z), parts["vae"].decode(z).sample) <= 1e-4


def test_checkpoint_without_vae_needs_one(tmp_path, tiny):
    no_vae = {k: v for k, v in state(tiny).items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, tmp_path / "novae.safetensors")
    with pytest.raises(CheckpointError, match="has no VAE: give one with `vae:`"):
        load_model(tmp_path / "novae.safetensors", config="tiny")
    save_file(vae_only(tiny, "first_stage_model."), tmp_path / "vae.safetensors")
    loaded = load_model(tmp_path / "novae.safetensors", config="tiny", vae=tmp_path / "vae.safetensors")
    assert_same_outputs(tiny, loaded.model)


def test_vae_override_that_is_not_a_vae_is_refused(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="given as a VAE but it is a LoRA"):
        load_model(path, vae=tmp_path / "lora.safetensors")


# ----------------------------------------------------------------------------------------------------
# bad files: each has its own message, always a CheckpointError naming the file


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_model(tmp_path / "nope.safetensors")


def test_empty_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: the file is empty \(0 bytes\)"):
        load_model(_write(tmp_path / "empty.ckpt", b""))


def test_truncated_safetensors(tmp_path, tiny):
    data = save_checkpoint(tiny, tmp_path / "full.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="truncated safetensors file \\(its tensors need"):
        load_model(_write(tmp_path / "cut.safetensors", data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated safetensors file \\(its header alone needs"):
        load_model(_write(tmp_path / "cut2.safetensors", data[:100]))


def test_truncated_ckpt(tmp_path, tiny):
    data = save_checkpoint(tiny, tmp_path / "full.ckpt").read_bytes()
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: truncated or corrupted checkpoint"):
        load_model(_write(tmp_path / "cut.ckpt", data[: len(data) // 2]), config="tiny")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some notes about my model\n", "a text file starting with 'just some notes"),
        (b"<!DOCTYPE html><html><body>Please log in</body></html>", "an HTML page, probably a failed"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n", "a Git LFS pointer"),
        (bytes(range(1, 200)), "unknown format"),
    ],
)
def test_files_that_are_not_weights(tmp_path, content, message):
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a weights file \(" + message):
        load_model(_write(tmp_path / "model.safetensors", content))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load: the pickle holds Python objects"):
        load_model(path)
    assert not marker.exists()


def test_pickle_of_something_else(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict of tensors"):
        load_model(tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"holds no tensors \(keys: epoch\)"):
        load_model(tmp_path / "meta.pt")


@pytest.mark.parametrize(
    ("keys", "kind", "message"),
    [
        (
            {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (4, 2)},
            "sdxl",
            "an SDXL checkpoint",
        ),
        ({"cond_stage_model.model.token_embedding.weight": (4, 2)}, "sd2", "an SD 2.x checkpoint"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (8, 8, 3, 3)}, "sd1-pix2pix", "InstructPix2Pix"),
        ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (4, 2)}, "diffusion-other", "not SD 1.x"),
        ({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": (4, 2)}, "lora", "a LoRA"),
        ({"conv_in.weight": (4, 2), "down_blocks.0.resnets.0.conv1.weight": (4, 2)}, "diffusers-unet", "pass the"),
        ({"fc.weight": (4, 2), "fc.bias": (4,)}, "unknown", r"not a Stable Diffusion checkpoint \(2 tensors, e.g. fc"),
    ],
)
def test_unsupported_kinds_are_named(tmp_path, keys, kind, message):
    assert detect_kind(keys).name == kind
    save_file({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "other.safetensors")


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path, tiny):
    sd = state(tiny)
    del sd["model.diffusion_model.out.2.weight"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "broken.safetensors", config="tiny")
    message = str(info.value)
    assert "broken.safetensors: does not fit model config 'tiny'" in message
    assert "1 missing: model.diffusion_model.out.2.weight" in message
    assert "1 unexpected: model.diffusion_model.extra.weight" in message
    assert "1 with the wrong shape: first_stage_model.decoder.conv_out.bias [5] (model wants [3])" in message


def test_long_lists_are_cut_with_a_count(tmp_path, tiny):
    sd = {k: v for k, v in state(tiny).items() if not k.startswith("model.diffusion_model.output_blocks")}
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: .* \(and \d+ more\)"):
        load_model(tmp_path / "m.safetensors", config="tiny")


def test_small_model_without_config_says_it_does_not_fit_sd15(tmp_path, tiny):
    torch.save(state(tiny), tmp_path / "m.ckpt")  # a .ckpt cannot carry our config
    with pytest.raises(CheckpointError, match="does not fit model config 'sd15'"):
        load_model(tmp_path / "m.ckpt")


def test_read_weights_is_lazy_for_safetensors(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    weights = read_weights(path)
    assert weights.tensors["model.diffusion_model.out.2.weight"].shape == (4, 32, 3, 3)
    assert torch.equal(weights.tensors["model.diffusion_model.out.2.weight"].load(), tiny.unet.out[2].weight)


# ----------------------------------------------------------------------------------------------------
# hashing


def test_model_hash_is_a1111s_and_cached(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_hash(path) == digest[:10]
    assert file_sha256(path) == digest
    # same size and mtime: the cached value is trusted without reading the file again
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path) == digest
    # a new mtime invalidates the entry
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert file_sha256(path) == hashlib.sha256(bytes(data)).hexdigest()


def test_hash_survives_an_unwritable_cache(tmp_path, tiny, monkeypatch):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("SDBATCH_CACHE", str(blocker))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_diffusers_folder_hash_follows_its_files(tmp_path):
    folder, _ = diffusers_folder(tmp_path / "sd")
    first = model_sha256(folder)
    assert len(first) == 64 and model_sha256(folder) == first
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert model_sha256(folder) != first


# ----------------------------------------------------------------------------------------------------
# model names


def test_models_are_found_by_path_or_by_name_in_the_weights_folder(tmp_path, monkeypatch, tiny):
    from sdbatch.checkpoints import resolve_model

    monkeypatch.setenv("SDBATCH_WEIGHTS", str(tmp_path))
    single = save_checkpoint(tiny, tmp_path / "mine.safetensors")
    folder_model = save_checkpoint(tiny, tmp_path / "small" / "model.safetensors")
    assert resolve_model(single) == single
    assert resolve_model("mine") == single
    assert resolve_model("small") == folder_model  # a folder holding model.safetensors
    assert resolve_model(tmp_path / "small") == folder_model
    diffusers, _ = diffusers_folder(tmp_path / "sd")
    assert resolve_model("sd") == diffusers  # a diffusers folder stays a folder
    with pytest.raises(CheckpointError, match="model 'nothing' not found; looked for"):
        resolve_model("nothing")
