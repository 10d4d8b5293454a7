"""Small pieces shared by the three networks."""

from torch import nn


def namespace(**modules: nn.Module) -> nn.Module:
    """An empty module holding children, so that state-dict keys carry the checkpoint's path segments
    (`model.diffusion_model`, `cond_stage_model.transformer.text_model`) without a class per level."""
    holder = nn.Module()
    for name, module in modules.items():
        holder.add_module(name, module)
    return holder
