"""The three SD v1 networks under one module whose state-dict keys are the LDM checkpoint's keys.

The configs import without torch (`sdbatch.models.configs`); the networks load on first use, so
`from sdbatch.models import SDConfig` stays cheap for the torch-free half of sdbatch.
"""

from typing import TYPE_CHECKING

from .configs import CONFIGS, CLIPConfig, SDConfig, UNetConfig, VAEConfig, get_config

if TYPE_CHECKING:
    from .network import StableDiffusion, build_model

__all__ = [
    "CONFIGS",
    "CLIPConfig",
    "SDConfig",
    "StableDiffusion",
    "UNetConfig",
    "VAEConfig",
    "build_model",
    "get_config",
]


def __getattr__(name: str):
    if name in ("StableDiffusion", "build_model"):
        from . import network

        return getattr(network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
