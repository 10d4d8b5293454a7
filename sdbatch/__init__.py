"""sdbatch: a batch renderer for Stable Diffusion v1.x."""

__version__ = "0.1.0"
