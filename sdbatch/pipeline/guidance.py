"""Classifier-free guidance as rows of one UNet batch (sgm's VanillaCFG split): prepare the rows,
run them, combine the outputs.

Each image has a cond row, and an uncond row unless its CFG is 1. Rows are grouped by context
length, since a long prompt's context is longer: padding it instead would change images depending
on their batch-mates.

A row's context follows a schedule (A1111's prompt editing `[from:to:when]` and alternation
`[a|b]`, in the prompt and in the negative prompt alike): a list of (end step, context). A prompt
without editing has one entry, and its rows are grouped once, exactly as without schedules.
"""

from bisect import bisect_left
from collections.abc import Callable, Sequence

import torch

# (end step, context (1, tokens, width)) pairs, end steps increasing: A1111's ScheduledPromptConditioning
Schedule = Sequence[tuple[int, torch.Tensor]]
Group = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # which rows, their latents, their contexts


def context_at(schedule: Schedule, step: int) -> torch.Tensor:
    """The context at sampling step `step`, counted from 0 over the steps actually run (img2img
    counts from its first step run). A1111's reconstruct_cond_batch: the first entry whose end step
    is >= step, so an entry ending at step e is still used at 0-based step e (with 10 steps,
    `[cat:dog:0.5]` gives 6 steps of cat, then dog); the first entry if none is."""
    return next((context for end, context in schedule if step <= end), schedule[0][1])


class GuidanceRows:
    def __init__(self, cfgs: Sequence[float], prompts: Sequence[tuple[Schedule, Schedule | None]], device):
        """`prompts[k]` = (cond, uncond) schedules of image k; uncond may be None where the CFG is 1."""
        schedules: list[Schedule] = []  # one UNet row each
        owner: list[int] = []  # the image (latent) each row belongs to
        for k, (cfg, (cond, uncond)) in enumerate(zip(cfgs, prompts, strict=True)):
            rows = [cond] if cfg == 1 else [cond, uncond]
            schedules += rows
            owner += [k] * len(rows)
        first_row = [owner.index(k) for k in range(len(cfgs))]  # cond row; uncond follows if guided
        self.guided = [k for k, cfg in enumerate(cfgs) if cfg != 1]
        self.rows = len(schedules)
        self.cond_rows = torch.tensor(first_row, device=device)
        self.uncond_rows = torch.tensor([first_row[k] + 1 for k in self.guided], dtype=torch.long, device=device)
        self.scales = torch.tensor([cfgs[k] for k in self.guided], device=device)[:, None, None, None]
        self.owner, self.schedules, self.device = owner, schedules, device
        # the steps after which some row's context may change; one value: no row ever changes
        self.ends = sorted({end for schedule in schedules for end, _ in schedule})
        self.phase = bisect_left(self.ends, 0)
        self.groups = self._group([context_at(s, 0) for s in schedules])

    def _group(self, contexts: list[torch.Tensor]) -> list[Group]:
        """The rows of equal context length, each group one UNet call."""
        groups: dict[int, list[int]] = {}
        for n, context in enumerate(contexts):
            groups.setdefault(context.shape[1], []).append(n)
        return [
            (
                torch.tensor(rows, device=self.device),
                torch.tensor([self.owner[n] for n in rows], device=self.device),
                torch.cat([contexts[n] for n in rows]),
            )
            for rows in groups.values()
        ]

    def groups_at(self, step: int) -> list[Group]:
        """The groups of step `step`: rebuilt only when the step crosses an end step (steps are
        walked in order; one set of groups is kept, so memory does not grow with the schedules)."""
        phase = bisect_left(self.ends, step)
        if phase != self.phase:
            self.phase = phase
            self.groups = self._group([context_at(s, step) for s in self.schedules])
        return self.groups

    def eps(
        self,
        x: torch.Tensor,
        x_in: torch.Tensor,
        run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        step: int,
    ) -> torch.Tensor:
        """Guided noise prediction at sampling step `step`, shaped like the latents `x`; `x_in` is
        what the UNet is given (scaled, with a 9-channel model's extra channels) and
        `run(x_in rows, context)` one UNet call."""
        eps_rows = x.new_empty((self.rows, *x.shape[1:]))
        for rows, latents, context in self.groups_at(step):
            eps_rows[rows] = run(x_in[latents], context).float()
        eps = eps_rows[self.cond_rows]
        if self.guided:
            uncond = eps_rows[self.uncond_rows]
            eps[self.guided] = uncond + self.scales * (eps[self.guided] - uncond)
        return eps
