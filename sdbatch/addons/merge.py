"""Merging a set of LoRAs into a model's weights, and taking them out again exactly.

Merged, not hooked: W' = W + sum(multiplier * delta) is computed once when the set of LoRAs changes,
so sampling pays nothing per step (a hook would add up(down(x)) to every layer in every step). A job
that renders many images with one set merges once; consecutive batches with the same set merge never.

Restored by copying, never by subtracting: the original of every changed weight is kept (a copy on
the CPU, in its own dtype) and copied back, so a model comes back bitwise as it was. Subtracting
the update again would leave rounding errors in fp16 weights that pile up over a sweep of LoRA sets.
"""

import time
from collections.abc import Sequence

import torch

from ..models.network import StableDiffusion
from .lora import LoraFile, Patch

# (file, text-encoder multiplier, UNet multiplier) for each LoRA, in prompt order
LoraSet = tuple[tuple[LoraFile, float, float], ...]


class Merger:
    """Keeps one model's weights equal to its originals plus the LoRA set last applied."""

    def __init__(self, model: StableDiffusion):
        self.model = model
        self.merge_seconds = 0.0  # what the last `apply` took, for reporting
        self._applied: LoraSet = ()
        self._originals: dict[str, torch.Tensor] = {}  # weight key -> its value before any merge

    @property
    def applied(self) -> LoraSet:
        """The set now merged; LoraFiles compare by identity (one read of a file), multipliers by value."""
        return self._applied

    def apply(self, loras: Sequence[tuple[LoraFile, float, float]]) -> None:
        """Make the model's weights its originals plus `loras`; nothing is done when that set is
        merged already. A multiplier of 0 adds nothing: an all-zero set leaves the weights bitwise as
        they were. DoRA's update depends on the weight it is added to, so each LoRA sees the weight
        with the LoRAs before it merged, as in A1111."""
        start = time.perf_counter()
        wanted: LoraSet = tuple((lora, float(te), float(unet)) for lora, te, unet in loras)
        if wanted != self._applied:
            self.restore()
            try:
                self._merge(wanted)
            except BaseException:
                self.restore()  # never leave a half-merged model behind
                raise
            self._applied = wanted
        self.merge_seconds = time.perf_counter() - start

    def restore(self) -> None:
        """Copy every changed weight's original back. Weights are looked up by name now, not kept from
        `apply`: the low-VRAM mode moves modules between devices in between."""
        with torch.no_grad():
            for key, original in self._originals.items():
                self.model.get_parameter(key).copy_(original)
        self._originals.clear()
        self._applied = ()

    def _merge(self, loras: LoraSet) -> None:
        with torch.no_grad():
            for key, updates in _updates(loras).items():
                weight = self.model.get_parameter(key)
                # kept on the CPU, as A1111 does: a LoCon touching most of the UNet would otherwise
                # hold a second copy of it in GPU memory; the copy back is one transfer per set change
                self._originals[key] = weight.detach().to("cpu", copy=True)
                merged = weight.float()
                for patch, multiplier in updates:
                    merged = merged + multiplier * patch.delta(merged)
                weight.copy_(merged.to(weight.dtype))


def _updates(loras: LoraSet) -> dict[str, list[tuple[Patch, float]]]:
    """For each weight some LoRA changes with a multiplier other than 0: its patches and multipliers."""
    updates: dict[str, list[tuple[Patch, float]]] = {}
    for lora, te, unet in loras:
        for key, patch in lora.patches.items():
            multiplier = te if patch.text_encoder else unet
            if multiplier != 0:
                updates.setdefault(key, []).append((patch, multiplier))
    return updates
