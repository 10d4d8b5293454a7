"""Classifier-free guidance as rows of one UNet batch (sgm's VanillaCFG split): prepare the rows,
run them, combine the outputs.

Each image has a cond row, and an uncond row unless its CFG is 1. Rows are grouped by context
length, since a long prompt's context is longer: padding it instead would change images depending
on their batch-mates.
"""

from collections.abc import Callable, Sequence

import torch


class GuidanceRows:
    def __init__(self, cfgs: Sequence[float], prompts: Sequence[tuple[torch.Tensor, torch.Tensor | None]], device):
        """`prompts[k]` = (cond, uncond) context of image k, each (1, tokens, width); uncond may be
        None where the CFG is 1."""
        contexts: list[torch.Tensor] = []  # one UNet row each
        owner: list[int] = []  # the image (latent) each row belongs to
        for k, (cfg, (cond, uncond)) in enumerate(zip(cfgs, prompts, strict=True)):
            rows = [cond] if cfg == 1 else [cond, uncond]
            contexts += rows
            owner += [k] * len(rows)
        first_row = [owner.index(k) for k in range(len(cfgs))]  # cond row; uncond follows if guided
        self.guided = [k for k, cfg in enumerate(cfgs) if cfg != 1]
        self.rows = len(contexts)
        self.cond_rows = torch.tensor(first_row, device=device)
        self.uncond_rows = torch.tensor([first_row[k] + 1 for k in self.guided], dtype=torch.long, device=device)
        self.scales = torch.tensor([cfgs[k] for k in self.guided], device=device)[:, None, None, None]
        groups: dict[int, list[int]] = {}
        for n, context in enumerate(contexts):
            groups.setdefault(context.shape[1], []).append(n)
        self.groups = [
            (
                torch.tensor(rows, device=device),  # which rows
                torch.tensor([owner[n] for n in rows], device=device),  # their latents
                torch.cat([contexts[n] for n in rows]),  # their contexts
            )
            for rows in groups.values()
        ]

    def eps(
        self, x: torch.Tensor, x_in: torch.Tensor, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Guided noise prediction, shaped like the latents `x`; `x_in` is what the UNet is given
        (scaled, with a 9-channel model's extra channels) and `run(x_in rows, context)` one UNet call."""
        eps_rows = x.new_empty((self.rows, *x.shape[1:]))
        for rows, latents, context in self.groups:
            eps_rows[rows] = run(x_in[latents], context).float()
        eps = eps_rows[self.cond_rows]
        if self.guided:
            uncond = eps_rows[self.uncond_rows]
            eps[self.guided] = uncond + self.scales * (eps[self.guided] - uncond)
        return eps
