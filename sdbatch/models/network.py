"""StableDiffusion: UNet + VAE + CLIP text encoder as one module with the LDM checkpoint's key names."""

import torch
from torch import nn

from .clip import CLIPTextEncoder
from .common import namespace
from .configs import SDConfig, get_config
from .unet import UNet
from .vae import AutoencoderKL


class StableDiffusion(nn.Module):
    """UNet + VAE + CLIP text encoder. `state_dict()` keys equal an original SD1.5 single-file
    checkpoint's, so loading one is a plain `load_state_dict` (see sdbatch.checkpoint)."""

    def __init__(self, cfg: SDConfig):
        super().__init__()
        self.config = cfg
        self.model = namespace(diffusion_model=UNet(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = CLIPTextEncoder(cfg.clip)

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextEncoder:
        return self.cond_stage_model


def build_model(
    config: "str | SDConfig" = "sd15", device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusion:
    """A randomly initialised model; on `device="meta"` it has shapes only and costs no memory."""
    cfg = get_config(config)
    with torch.device(device):
        model = StableDiffusion(cfg)
    return model.to(dtype=dtype)
