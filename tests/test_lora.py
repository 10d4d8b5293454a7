"""LoRA / LyCORIS files merged into our model: against diffusers + peft where they load the format, against
the formulas (written out here, apart from sdbatch's code) where they do not; exact restoration; refusals."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPORT, make_tiny
from diffusers import StableDiffusionPipeline
from helpers import diffusers_scheduler, max_diff
from lora_files import (
    dora,
    kohya_layers,
    kohya_lora,
    locon_tucker,
    loha,
    lokr,
    peft_lora,
    processor_lora,
    save,
    te_layers,
    unet_layers,
)
from test_models import carried

from sdbatch.addons.lora import LoraError, LoraFile, read_lora
from sdbatch.addons.merge import Merger
from sdbatch.checkpoints.read import CheckpointError
from sdbatch.convert import to_diffusers
from sdbatch.models import CONFIGS

TOL = 1e-4  # outputs against diffusers
FORMULA_TOL = 1e-5  # weights against the formulas
CFG = CONFIGS["tiny"]


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read(path: Path, model) -> LoraFile:
    return read_lora(path, shapes(model), model.config.unet)


def kohya_file(path: Path, model, conv: bool = True, seed: int = 0) -> LoraFile:
    kohya_lora(path, kohya_layers(model.config, conv), seed=seed)
    return read(path, model)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def inputs(cfg):
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, cfg.unet.in_channels, 16, 16, generator=g), torch.tensor([10, 700])
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    return x, t, context, ids


def ours_out(model):
    x, t, context, ids = inputs(model.config)
    with torch.no_grad():
        return model.unet(x, t, context), model.text_encoder(ids)


def theirs_out(pipe, cfg):
    x, t, context, ids = inputs(cfg)
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(input_ids=ids).last_hidden_state


def diffusers_pipeline(model) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=carried(model, "vae"),
        text_encoder=carried(model, "text_encoder"),
        tokenizer=None,
        unet=carried(model, "unet"),
        scheduler=diffusers_scheduler("euler", False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def merged_like_diffusers(path: Path, te: float, unet: float, label: str) -> None:
    """Our merge and diffusers' load_lora_weights + fuse_lora of one file give the same outputs."""
    model = make_tiny()
    pipe = diffusers_pipeline(model)
    before = ours_out(model)
    Merger(model).apply([(read(path, model), te, unet)])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet"], lora_scale=unet)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=te)
    ours, theirs = ours_out(model), theirs_out(pipe, model.config)
    for name, a, b, b0 in zip(("unet", "text encoder"), ours, theirs, before, strict=True):
        moved, diff = max_diff(b, b0), max_diff(a, b)
        REPORT.append(f"{label} {name} vs diffusers: {diff:.2e} (the LoRA moved it by {moved:.2e})")
        assert moved > 100 * TOL, f"{label}: the LoRA changed nothing in the {name}"
        assert diff <= TOL, f"{label} {name}"


# ----------------------------------------------------------------------------------------------------
# against diffusers + peft


def test_kohya_locon_matches_diffusers(tmp_path):
    """Attention, feed-forward, projections, time embedding and 3x3 ResNet convs (LoCon) in the UNet,
    q/k/v/out/fc1/fc2 in the text encoder; alpha != rank, multipliers != 1 and different per part."""
    model = make_tiny()
    path = tmp_path / "locon.safetensors"
    kohya_lora(path, kohya_layers(model.config), rank=4, alpha=2.0)
    lora = read(path, model)
    assert lora.format == "LoCon"
    assert any(p.shape[2:] == (3, 3) for p in lora.patches.values())
    assert sum(p.text_encoder for p in lora.patches.values()) == 2 * 6  # 2 layers x q, k, v, out, fc1, fc2
    merged_like_diffusers(path, te=0.6, unet=0.8, label="kohya LoCon")


def test_kohya_linear_lora_matches_diffusers(tmp_path):
    model = make_tiny()
    path = tmp_path / "lora.safetensors"
    kohya_lora(path, kohya_layers(model.config, conv=False), rank=3, alpha=6.0, seed=1)
    assert read(path, model).format == "kohya LoRA"
    merged_like_diffusers(path, te=1.3, unet=0.7, label="kohya LoRA")


def test_peft_lora_matches_diffusers(tmp_path):
    """Made by peft, saved by diffusers with its metadata: alpha per component, an alpha_pattern,
    transformers 5 names (no `text_model.` level) for the text encoder."""
    model = make_tiny()
    path = peft_lora(tmp_path / "peft.safetensors", model.config)
    lora = read(path, model)
    assert lora.format == "PEFT LoRA"
    alphas = {p.alpha for p in lora.patches.values()}
    assert alphas == {6.0, 2.0, 5.0}  # unet, unet ff.net.2 (alpha_pattern), text encoder
    merged_like_diffusers(path, te=0.9, unet=0.7, label="PEFT LoRA")


def test_peft_names_without_component_prefix(tmp_path):
    """PEFT keys as peft itself saves them (`base_model.model.<path>`) or bare paths read alike."""
    from safetensors import safe_open

    model = make_tiny()
    path = peft_lora(tmp_path / "peft.safetensors", model.config)
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    renamed = {
        k.replace("unet.", "base_model.model.", 1) if k.startswith("unet.") else k.removeprefix("text_encoder."): v
        for k, v in tensors.items()
    }
    other = save(tmp_path / "bare.safetensors", renamed, metadata)
    results = []
    for file in (path, other):
        copy = make_tiny()
        Merger(copy).apply([(read(file, copy), 0.5, 1.5)])
        results.append(copy.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


# ----------------------------------------------------------------------------------------------------
# against the formulas, worked out here from the tensors each writer returns


def merged_deltas(model, path: Path, te: float, unet: float) -> tuple[dict, dict]:
    """The weights before merging and what merging did to them, by diffusers/transformers name
    (`unet.<path>`, `te.text_model.<path>`)."""

    def named(state: dict) -> dict[str, torch.Tensor]:
        parts = to_diffusers(state, model.config)
        return {
            f"{'te' if part == 'text_encoder' else part}.{key.removesuffix('.weight')}": value
            for part in ("unet", "text_encoder")
            for key, value in parts[part].items()
            if key.endswith(".weight")
        }

    before = named(snapshot(model))
    Merger(model).apply([(read(path, model), te, unet)])
    return before, {k: v - before[k] for k, v in named(model.state_dict()).items()}


@functools.cache
def kohya_to_diffusers() -> dict[str, str]:
    """`lora_unet_down_blocks_0_..._to_q` -> `unet.down_blocks.0....to_q`, through diffusers' own names."""
    names = {"lora_unet_" + n.replace(".", "_"): "unet." + n for n in unet_layers(CFG)}
    return names | {"lora_te_" + n.replace(".", "_"): "te." + n for n in te_layers(CFG)}


def check_formula(model, path: Path, written: dict, update, te: float = 0.8, unet: float = 0.6) -> int:
    """Every layer in the file changed by multiplier * update(its tensors, weight shape); others not at all."""
    names = {key.split(".")[0] for key in written}
    targets = {kohya_to_diffusers()[name] for name in names}
    weights, deltas = merged_deltas(model, path, te, unet)
    worst = 0.0
    for name in names:
        target = kohya_to_diffusers()[name]
        t = {key.split(".", 1)[1]: v.float() for key, v in written.items() if key.split(".")[0] == name}
        multiplier = te if target.startswith("te.") else unet
        want = multiplier * update(t, deltas[target].shape, weights[target])
        worst = max(worst, max_diff(deltas[target], want))
        assert max_diff(deltas[target], want) <= FORMULA_TOL, target
    REPORT.append(f"{path.stem}: {len(names)} layers against the formula, worst {worst:.2e}")
    untouched = [k for k, d in deltas.items() if k not in targets and d.abs().max() > 0]
    assert not untouched
    return len(names)


def lora_update(t, shape, _weight=None):
    rank = t["lora_down.weight"].shape[0]
    scale = float(t["alpha"]) / rank if "alpha" in t else 1.0
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if "lora_mid.weight" in t:  # CP: up [o, r] . mid [r, r, k, k] . down [r, i]
        w = torch.einsum("or,rskl,si->oikl", up.flatten(1), t["lora_mid.weight"], down.flatten(1))
    else:
        w = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    return scale * w.reshape(shape)


def test_locon_tucker_matches_formula(tmp_path):
    model = make_tiny()
    path = tmp_path / "tucker.safetensors"
    written = locon_tucker(path, kohya_layers(model.config))
    assert any(k.endswith("lora_mid.weight") for k in written)
    assert check_formula(model, path, written, lora_update) > 20


def hadamard(t, shape, _weight=None):
    rank = t["hada_w1_b"].shape[0]
    if "hada_t1" in t:  # Tucker: W_n[o, i, k, l] = sum t[p, q, k, l] a[p, o] b[q, i]
        w1 = torch.einsum("pqkl,po,qi->oikl", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = torch.einsum("pqkl,po,qi->oikl", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
    return (float(t["alpha"]) / rank * w1 * w2).reshape(shape)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_matches_formula(tmp_path, tucker):
    model = make_tiny()
    path = tmp_path / "loha.safetensors"
    written = loha(path, kohya_layers(model.config), tucker=tucker)
    assert read(path, model).format == "LoHa"
    assert check_formula(model, path, written, hadamard) > 20


def kronecker(t, shape, _weight=None):
    """LyCORIS: scale alpha / rank where a factor is low-rank (rank: w2_b's, else w1_b's), else 1."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("pqkl,pb,qd->bdkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]  # [b, d*k*k]
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if len(shape) == 4 else w2
    ranked = [t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t]
    scale = float(t["alpha"]) / ranked[0] if ranked else 1.0
    a, c = w1.shape
    b, d = w2.shape[:2]
    # kron by its definition: W[i*b + p, j*d + q, ...] = w1[i, j] * w2[p, q, ...]
    full = torch.einsum("ij,pq...->ipjq...", w1, w2).reshape(a * b, c * d, *w2.shape[2:])
    return scale * full.reshape(shape)


@pytest.mark.parametrize(
    ("decompose", "tucker"), [((), False), (("w1",), False), (("w2",), False), (("w1", "w2"), False), (("w2",), True)]
)
def test_lokr_matches_formula(tmp_path, decompose, tucker):
    model = make_tiny()
    path = tmp_path / "lokr.safetensors"
    written = lokr(path, kohya_layers(model.config), decompose=decompose, tucker=tucker)
    assert read(path, model).format == "LoKr"
    assert check_formula(model, path, written, kronecker) > 20


def dora_in(t, shape, weight):
    """A1111 `apply_weight_decompose`: M = W + s*up@down; W' = M * dora_scale / ||M|| per input column."""
    merged = weight.float() + lora_update(t, shape)
    norm = torch.stack([merged[:, i].norm() for i in range(merged.shape[1])])
    view = (1, -1) + (1,) * (merged.ndim - 2)
    return merged * t["dora_scale"].reshape(view) / norm.reshape(view) - weight.float()


def dora_out(t, shape, weight):
    """LyCORIS wd_on_out: the norm of each output row instead."""
    merged = weight.float() + lora_update(t, shape)
    norm = torch.stack([merged[o].norm() for o in range(merged.shape[0])])
    view = (-1,) + (1,) * (merged.ndim - 1)
    return merged * t["dora_scale"].reshape(view) / norm.reshape(view) - weight.float()


@pytest.mark.parametrize(("side", "formula"), [("in", dora_in), ("out", dora_out)])
def test_dora_matches_formula(tmp_path, side, formula):
    model = make_tiny()
    path = tmp_path / "dora.safetensors"
    written = dora(path, kohya_layers(model.config), side=side)
    lora = read(path, model)
    assert lora.format == "DoRA"
    assert {p.dora for p in lora.patches.values()} == {side}
    assert check_formula(model, path, written, formula) > 20


def test_processor_names_match_formula(tmp_path):
    model = make_tiny()
    path = tmp_path / "processor.safetensors"
    written = processor_lora(path, model.config)
    lora = read(path, model)
    assert lora.format == "diffusers LoRA"
    assert len(lora.patches) == len(written) // 2
    before = to_diffusers(snapshot(model), model.config)
    Merger(model).apply([(lora, 0.5, 0.25)])
    after = to_diffusers(model.state_dict(), model.config)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora"
    want = 0.25 * written[f"{prefix}.up.weight"] @ written[f"{prefix}.down.weight"]
    assert max_diff(after["unet"][key] - before["unet"][key], want) <= FORMULA_TOL
    key = "text_model.encoder.layers.1.self_attn.k_proj.weight"
    prefix = "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora"
    want = 0.5 * written[f"{prefix}.up.weight"] @ written[f"{prefix}.down.weight"]
    assert max_diff(after["text_encoder"][key] - before["text_encoder"][key], want) <= FORMULA_TOL


def test_one_by_one_convs_both_ways(tmp_path):
    """proj_in/proj_out are 1x1 convs [out, in, 1, 1] here; LoRAs trained on linear projections give
    them 2D down/up. And a 1x1-conv LoRA for a linear layer (to_q) fits too."""
    model = make_tiny()
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(3)
    written = {
        f"{proj}.lora_down.weight": torch.randn(2, 32, generator=g),
        f"{proj}.lora_up.weight": torch.randn(32, 2, generator=g),
        f"{to_q}.lora_down.weight": torch.randn(2, 32, 1, 1, generator=g),
        f"{to_q}.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
    }
    path = save(tmp_path / "mixed.safetensors", written)
    assert check_formula(model, path, written, lora_update) == 2


def test_ldm_names_and_pickles_read_alike(tmp_path):
    """kohya names on LDM paths (`lora_unet_input_blocks_1_1_...`, as A1111 accepts) and a .pt file
    give the same merge as the diffusers-named .safetensors."""
    model = make_tiny()
    written = kohya_lora(tmp_path / "a.safetensors", kohya_layers(model.config), seed=4)
    renames = {  # LDM paths written by hand: level 0 has attention, level 1 not (tiny config)
        "lora_unet_down_blocks_0_attentions_0_": "lora_unet_input_blocks_1_1_",
        "lora_unet_down_blocks_0_resnets_1_conv1.": "lora_unet_input_blocks_2_0_in_layers_2.",
        "lora_unet_up_blocks_1_attentions_2_": "lora_unet_output_blocks_5_1_",
        "lora_unet_mid_block_resnets_1_time_emb_proj.": "lora_unet_middle_block_2_emb_layers_1.",
    }
    ldm = dict(written)
    for old, new in renames.items():
        ldm = {k.replace(old, new): v for k, v in ldm.items()}
        assert any(k.startswith(new) for k in ldm), new
    results = []
    for path in (tmp_path / "a.safetensors", save(tmp_path / "b.safetensors", ldm), save(tmp_path / "c.pt", written)):
        copy = make_tiny()
        Merger(copy).apply([(read(path, copy), 0.5, 1.5)])
        results.append(copy.state_dict())
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_inpainting_conv_in_is_padded(tmp_path):
    """A LoRA for conv_in of a 4-channel model changes the first 4 input channels of a 9-channel
    inpainting conv_in and leaves the mask / masked-image channels as they are (A1111 pads with zeros)."""
    model = make_tiny("tiny-inpainting")
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 4, 3, 3, generator=g), torch.randn(32, 2, 1, 1, generator=g)
    path = save(
        tmp_path / "conv_in.safetensors",
        {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up},
    )
    key = "model.diffusion_model.input_blocks.0.0.weight"
    before = model.state_dict()[key].clone()
    Merger(model).apply([(read(path, model), 1.0, 0.5)])
    change = model.state_dict()[key] - before
    assert max_diff(change[:, :4], 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(32, 4, 3, 3)) <= FORMULA_TOL
    assert torch.equal(change[:, 4:], torch.zeros_like(change[:, 4:]))


# ----------------------------------------------------------------------------------------------------
# merging and restoring


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_restore_is_bitwise(tmp_path, dtype):
    model = make_tiny().to(dtype)
    original = snapshot(model)
    a = kohya_file(tmp_path / "a.safetensors", model)
    lokr(tmp_path / "b.safetensors", kohya_layers(model.config), decompose=("w2",), seed=2)
    b = read(tmp_path / "b.safetensors", model)
    merger = Merger(model)
    merger.apply([(a, 1.0, 1.0)])
    with_a = snapshot(model)
    assert sum(not torch.equal(original[k], v) for k, v in with_a.items()) == len(a.patches)
    merger.apply([(b, 0.5, 0.7), (a, 0.3, 1.0)])
    merger.apply([(a, 1.0, 1.0)])
    assert all(torch.equal(with_a[k], v) for k, v in model.state_dict().items())  # same set, same weights
    merger.restore()
    assert merger.applied == ()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(original[k], v)]
    assert not changed
    assert all(v.dtype == dtype for v in model.state_dict().values())


def test_zero_multipliers_leave_weights_bitwise(tmp_path):
    model = make_tiny()
    original = snapshot(model)
    lora = kohya_file(tmp_path / "a.safetensors", model)
    merger = Merger(model)
    merger.apply([(lora, 0.0, 0.0)])
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    merger.apply([(lora, 0.0, 1.0)])  # the text encoder untouched, the UNet changed
    state = model.state_dict()
    te = [k for k in state if k.startswith("cond_stage_model.")]
    assert all(torch.equal(original[k], state[k]) for k in te)
    assert all(not torch.equal(original[k], state[k]) for k, p in lora.patches.items() if not p.text_encoder)


def test_same_set_is_not_merged_again(tmp_path, monkeypatch):
    model = make_tiny()
    lora = kohya_file(tmp_path / "a.safetensors", model)
    merger = Merger(model)
    merger.apply([(lora, 1.0, 0.5)])
    assert merger.applied == ((lora, 1.0, 0.5),)
    assert merger.merge_seconds > 0

    def refuse(*args):
        raise AssertionError("merged again")

    monkeypatch.setattr(type(next(iter(lora.patches.values()))), "delta", refuse)
    merger.apply([(lora, 1, 0.5)])  # an equal set: nothing to do
    another = read(lora.path, model)  # another read of the same file is another LoRA
    with pytest.raises(AssertionError, match="merged again"):
        merger.apply([(another, 1.0, 0.5)])
    assert merger.applied == ()  # a failed merge leaves the originals, not half a merge


def test_restore_finds_weights_by_name(tmp_path):
    """Low-VRAM mode moves modules between devices, which may give them new Parameter objects:
    restore writes into whatever the model holds under each name at that time."""
    model = make_tiny()
    original = snapshot(model)
    merger = Merger(model)
    merger.apply([(kohya_file(tmp_path / "a.safetensors", model), 1.0, 1.0)])
    attention = model.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    attention.weight = torch.nn.Parameter(attention.weight.detach().clone(), requires_grad=False)
    merger.restore()
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_bundled_embeddings_are_skipped_and_said(tmp_path):
    model = make_tiny()
    written = kohya_lora(tmp_path / "a.safetensors", kohya_layers(model.config, conv=False))
    written["bundle_emb.mycat.string_to_param.*"] = torch.zeros(2, 32)
    lora = read(save(tmp_path / "a.safetensors", written), model)
    assert lora.skipped == ("bundle_emb.mycat.string_to_param.*",)
    assert lora.format == "kohya LoRA"


def test_merge_sums_two_loras(tmp_path):
    model = make_tiny()
    a = kohya_file(tmp_path / "a.safetensors", model, conv=False, seed=1)
    b = kohya_file(tmp_path / "b.safetensors", model, conv=False, seed=2)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w = model.state_dict()[key].clone()
    Merger(model).apply([(a, 1.0, 0.5), (b, 1.0, -0.25)])
    want = w + 0.5 * a.patches[key].delta(w) - 0.25 * b.patches[key].delta(w)
    assert max_diff(model.state_dict()[key], want) <= FORMULA_TOL


# ----------------------------------------------------------------------------------------------------
# refusals: one line naming the file, and what is wrong


def refused(path: Path, model, *words: str, error=LoraError) -> str:
    with pytest.raises(error) as caught:
        read(path, model)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_refuses_layers_the_model_lacks(tmp_path):
    model = make_tiny()
    layers = kohya_layers(model.config, conv=False)
    extra = {f"lora_te_text_model_encoder_layers_{n}_self_attn_q_proj": (32, 32) for n in range(2, 9)}
    path = tmp_path / "deeper.safetensors"
    kohya_lora(path, layers | extra)
    message = refused(path, model, "7 of its", "lora_te_text_model_encoder_layers_2_self_attn_q_proj", "...")
    assert "layers_7" not in message  # the first five only


def test_refuses_sdxl(tmp_path):
    model = make_tiny()
    g = torch.Generator().manual_seed(0)
    named = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32, generator=g)}
    named["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(32, 2, generator=g)
    refused(save(tmp_path / "te1.safetensors", named), model, "is an SDXL LoRA; sdbatch renders SD 1.x")
    # UNet only, LDM names as kohya writes SDXL's: its cross-attention reads 2048-wide text
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    wide = {f"{key}.lora_down.weight": torch.randn(2, 2048), f"{key}.lora_up.weight": torch.randn(640, 2)}
    refused(save(tmp_path / "unet.safetensors", wide), model, "is an SDXL LoRA")


def test_refuses_sd2(tmp_path):
    model = make_tiny()
    layers = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 1024),
    }
    path = tmp_path / "sd2.safetensors"
    kohya_lora(path, layers)
    refused(path, model, "is an SD 2.x LoRA; sdbatch renders SD 1.x")


def test_refuses_wrong_shapes(tmp_path):
    model = make_tiny()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    path = tmp_path / "shapes.safetensors"
    kohya_lora(path, {name: (32, 99)})
    refused(
        path,
        model,
        name,
        "[32, 99]",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "[32, 128]",
    )
    up = {f"{name}.lora_down.weight": torch.zeros(4, 128), f"{name}.lora_up.weight": torch.zeros(32, 3)}
    refused(save(tmp_path / "chain.safetensors", up), model, name, "does not chain")


def test_refuses_truncated_and_empty_files(tmp_path):
    model = make_tiny()
    path = tmp_path / "cut.safetensors"
    kohya_lora(path, kohya_layers(model.config))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(path, model, "truncated", error=CheckpointError)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused(tmp_path / "empty.safetensors", model, "empty", error=CheckpointError)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_pickle_with_code_without_running_it(tmp_path):
    model = make_tiny()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    torch.save({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.alpha": _Payload(marker)}, path)
    refused(path, model, "refused to load", error=CheckpointError)
    assert not marker.exists()


def test_refuses_files_that_are_no_lora(tmp_path):
    model = make_tiny()
    checkpoint = save(tmp_path / "model.safetensors", dict(model.state_dict()))
    refused(checkpoint, model, "not a LoRA", "SD 1.x checkpoint")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    oft = {f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(1.0)}
    refused(save(tmp_path / "oft.safetensors", oft), model, "uses LyCORIS OFT", f"{name}.oft_blocks")
    half = {f"{name}.lora_down.weight": torch.zeros(2, 32)}
    refused(save(tmp_path / "half.safetensors", half), model, name, "make no LoRA")
    odd = kohya_lora(tmp_path / "odd.safetensors", {name: (32, 32, 1, 1)}) | {f"{name}.bias": torch.zeros(32)}
    refused(save(tmp_path / "odd.safetensors", odd), model, "keys that are no LoRA weights", f"{name}.bias")


def test_reading_needs_no_torch(tmp_path):
    model = make_tiny()
    checkpoint = save(tmp_path / "model.safetensors", dict(model.state_dict()))
    kohya_lora(tmp_path / "a.safetensors", kohya_layers(model.config))
    kohya_lora(tmp_path / "sd2.safetensors", {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024)})
    code = (
        "import sys\n"
        "from sdbatch.addons.lora import LoraError, read_lora\n"
        "from sdbatch.checkpoints.read import read_weights\n"
        "from sdbatch.models.configs import CONFIGS\n"
        f"shapes = read_weights({str(checkpoint)!r}).shapes()\n"
        f"lora = read_lora({str(tmp_path / 'a.safetensors')!r}, shapes, CONFIGS['tiny'].unet)\n"
        "print(lora.format, len(lora.patches))\n"
        "try:\n"
        f"    read_lora({str(tmp_path / 'sd2.safetensors')!r}, shapes, CONFIGS['tiny'].unet)\n"
        "except LoraError as e:\n"
        "    print(e)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"LoCon {len(kohya_layers(model.config))}"
    assert "is an SD 2.x LoRA" in out.stdout.splitlines()[1]
