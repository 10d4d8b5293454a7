"""Rules from LDM checkpoint keys (our module names) to diffusers folder keys.

Every rule follows from the block structure in the config, so one function per network names any
key of any SD1-shaped model; no table of a thousand renames. Used both ways: to read a diffusers
folder (`sdbatch.checkpoints`) and to hand our weights to diffusers in the parity tests.
"""

from typing import TYPE_CHECKING, Any

from .models.configs import SDConfig, UNetConfig, VAEConfig

if TYPE_CHECKING:
    import torch

# where each diffusers component lives inside the single-file checkpoint
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# names of the same tensors in diffusers folders saved before diffusers 0.14
LEGACY_VAE_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _rename(parts: list[str], table: dict[str, str]) -> str:
    key = ".".join(parts)
    for old, new in table.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def unet_key(key: str, cfg: UNetConfig) -> str:
    """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight`."""
    p = key.split(".")
    per_level = cfg.num_res_blocks + 1  # res blocks, then the down/upsampler
    if p[0] == "time_embed":
        return f"time_embedding.linear_{1 if p[1] == '0' else 2}.{p[2]}"
    if p[0] == "out":
        return f"{'conv_norm_out' if p[1] == '0' else 'conv_out'}.{p[2]}"
    if p[0] == "middle_block":
        j, rest = int(p[1]), p[2:]
        if j == 1:
            return "mid_block.attentions.0." + ".".join(rest)
        return f"mid_block.resnets.{j // 2}." + _rename(rest, _UNET_RESNET)
    i, j, rest = int(p[1]), int(p[2]), p[3:]
    if p[0] == "input_blocks":
        if i == 0:
            return "conv_in." + ".".join(rest)
        level, layer = divmod(i - 1, per_level)
        if rest[0] == "op":
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[1]}"
        block = f"down_blocks.{level}"
    elif p[0] == "output_blocks":
        level, layer = divmod(i, per_level)
        if rest[0] == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[1]}"
        block = f"up_blocks.{level}"
    else:
        raise KeyError(key)
    if j == 0:
        return f"{block}.resnets.{layer}." + _rename(rest, _UNET_RESNET)
    return f"{block}.attentions.{layer}." + ".".join(rest)


def vae_key(key: str, cfg: VAEConfig) -> str:
    """`decoder.up.3.block.0.nin_shortcut.weight` -> `decoder.up_blocks.0.resnets.0.conv_shortcut.weight`."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return key
    part, head = p[0], p[1]
    if head == "norm_out":
        return f"{part}.conv_norm_out.{p[2]}"
    if head == "mid":
        if p[2] == "attn_1":
            return f"{part}.mid_block.attentions.0.{_VAE_ATTN[p[3]]}.{p[4]}"
        return f"{part}.mid_block.resnets.{0 if p[2] == 'block_1' else 1}." + _rename(p[3:], _VAE_RESNET)
    level = int(p[2])
    # LDM numbers decoder stages by resolution (up.0 = full size); diffusers by execution order
    index = level if head == "down" else len(cfg.ch_mult) - 1 - level
    blocks = f"{part}.{head}_blocks.{index}"
    if p[3] == "block":
        return f"{blocks}.resnets.{p[4]}." + _rename(p[5:], _VAE_RESNET)
    return f"{blocks}.{head}samplers.0.conv.{p[-1]}"  # downsample.conv / upsample.conv


def is_vae_attn_matrix(key: str) -> bool:
    """1x1 conv weights in LDM, (C, C) linear weights in diffusers."""
    p = key.split(".")
    return len(p) == 5 and p[1:3] == ["mid", "attn_1"] and p[3] in ("q", "k", "v", "proj_out") and p[4] == "weight"


def diffusers_key(key: str, cfg: SDConfig) -> tuple[str, str]:
    """A full checkpoint key -> (diffusers component, key inside that component's weights file)."""
    for component, prefix in PREFIXES.items():
        if key.startswith(prefix):
            inner = key[len(prefix) :]
            if component == "unet":
                return component, unet_key(inner, cfg.unet)
            if component == "vae":
                return component, vae_key(inner, cfg.vae)
            return component, inner
    raise KeyError(f"{key} is not part of an SD v1 checkpoint")


def to_diffusers(state_dict: "dict[str, torch.Tensor]", cfg: SDConfig) -> "dict[str, dict[str, torch.Tensor]]":
    """Split a checkpoint state dict into diffusers components {unet, vae, text_encoder}."""
    out: dict[str, dict[str, Any]] = {name: {} for name in PREFIXES}
    for key, tensor in state_dict.items():
        component, name = diffusers_key(key, cfg)
        if component == "vae" and is_vae_attn_matrix(key[len(PREFIXES["vae"]) :]):
            tensor = tensor[:, :, 0, 0]
        out[component][name] = tensor
    return out
