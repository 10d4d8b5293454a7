"""Writes the tiny upscaler the tests and examples use for hires fix (run from the checkout:
`python jobs/make_upscaler.py`; the file is committed, about 60 KB, so this is only needed to see how
it was made).

- `upscalers/tiny-rrdb-x2.safetensors`: an RRDBNet shaped like Real-ESRGAN's RealESRGAN_x2plus (Real-ESRGAN
  key layout; the image pixel-unshuffled by 2 into 12 channels, two x2 upsampling stages), but tiny:
  nf 8, nb 1, gc 4, so that 32 -> 64 pixels runs in milliseconds on a CPU. It was not trained: its
  weights are seeded random numbers, plus a plain path through channels 0-2 (the mean of each 2x2
  block, carried through every conv unchanged) so that what comes out is the picture, blocky and
  slightly disturbed, rather than noise.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdbatch.upscale.files import expected_shapes

HERE = Path(__file__).resolve().parent
TINY = HERE / "upscalers" / "tiny-rrdb-x2.safetensors"


def tiny_rrdb_x2(seed: int = 0) -> dict[str, torch.Tensor]:
    nf, nb, gc, upsamples, unshuffle = 8, 1, 4, 2, 2
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(nf, nb, gc, upsamples, in_nc=3 * unshuffle**2)
    tensors = {key: torch.randn(shape, generator=generator) * 0.005 for key, shape in sorted(shapes.items())}
    for colour in range(3):  # pixel_unshuffle puts the 2x2 block of colour c in channels 4c .. 4c+3
        tensors["conv_first.weight"][colour, 4 * colour : 4 * colour + 4, 1, 1] += 0.25
        for conv in ("conv_up1", "conv_up2", "conv_hr", "conv_last"):
            tensors[f"{conv}.weight"][colour, colour, 1, 1] += 1.0
    return {key: tensor.contiguous() for key, tensor in tensors.items()}


if __name__ == "__main__":
    TINY.parent.mkdir(exist_ok=True)
    save_file(tiny_rrdb_x2(), TINY, metadata={"architecture": "RRDBNet, Real-ESRGAN layout, seed 0"})
