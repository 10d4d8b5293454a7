"""What a set of tensor names and shapes is: SD1, SD1-inpainting, SD2, SDXL, a LoRA, a VAE, ..."""

from dataclasses import dataclass

from ..convert import PREFIXES

VAE_PREFIX = PREFIXES["vae"]


@dataclass(frozen=True)
class Kind:
    name: str  # sd1, sd1-inpainting, sd1-vae, sd2, sdxl, ...
    description: str

    @property
    def loadable(self) -> bool:
        return self.name in ("sd1", "sd1-inpainting")


def detect_kind(shapes: dict[str, tuple[int, ...]]) -> Kind:
    """Tell SD1 / SD1-inpainting / SD2 / SDXL / other files apart by their key names and shapes."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    first_conv = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    to_k = shapes.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if has("conditioner.embedders."):
        return Kind("sdxl", "an SDXL checkpoint (two text encoders under conditioner.embedders.*)")
    if has("cond_stage_model.model.") or (to_k is not None and to_k[1] == 1024):
        return Kind("sd2", "an SD 2.x checkpoint (OpenCLIP ViT-H text encoder, 1024-wide context)")
    if first_conv is not None:
        channels = first_conv[1]
        if channels == 4:
            return Kind("sd1", "an SD 1.x checkpoint")
        if channels == 9:
            return Kind("sd1-inpainting", "an SD 1.x inpainting checkpoint (9-channel UNet)")
        if channels == 8:
            return Kind("sd1-pix2pix", "an InstructPix2Pix checkpoint (8-channel UNet)")
        return Kind("unet-other", f"a UNet with {channels} input channels, not SD 1.x")
    if has("model.diffusion_model."):
        example = next(k for k in keys if k.startswith("model.diffusion_model."))
        return Kind("diffusion-other", f"a diffusion model that is not SD 1.x (e.g. key {example})")
    if has("lora_unet_") or has("lora_te") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        return Kind("lora", "a LoRA (low-rank add-on weights), not a full model")
    if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        diffusers = has("encoder.down_blocks.")
        return Kind(
            "vae-diffusers" if diffusers else "sd1-vae",
            "a VAE in diffusers layout" if diffusers else "a VAE (first_stage_model weights)",
        )
    if has(VAE_PREFIX) and not has("cond_stage_model."):
        return Kind("sd1-vae", "a VAE (first_stage_model weights)")
    if "conv_in.weight" in keys and has("down_blocks."):
        return Kind("diffusers-unet", "a diffusers UNet weights file; pass the whole diffusers folder instead")
    if has("text_model."):
        return Kind("text-encoder", "a CLIP text encoder alone")
    examples = ", ".join(list(keys)[:3])
    return Kind("unknown", f"not a Stable Diffusion checkpoint ({len(shapes)} tensors, e.g. {examples})")
