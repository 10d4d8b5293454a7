"""Forward-pass speed of our networks against diffusers / transformers, same weights, same process.

    python bench/models.py                        # sd15 UNet at 256x256, batch 2, on CPU
    python bench/models.py --size 512 --batch 8   # on a GPU: fp16 is used automatically

Runs are interleaved (ours, theirs, ours, ...) so that a machine getting busier penalises both;
the figure to read is the ratio in the last column (< 1 means sdbatch is faster).
Needs the test extra (diffusers). Prints one markdown table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import diffusers_unet, diffusers_vae, for_twin, transformers_clip

from sdbatch.convert import to_diffusers
from sdbatch.models import build_model


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd15")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    torch.manual_seed(0)
    ours = build_model(args.config).eval().requires_grad_(False)
    cfg = ours.config
    parts = to_diffusers(ours.state_dict(), cfg)
    twins = {}
    for name, make in (("unet", diffusers_unet), ("vae", diffusers_vae), ("text_encoder", transformers_clip)):
        twin = make(cfg).eval().requires_grad_(False)
        twin.load_state_dict(for_twin(twin, parts[name]), strict=True)
        twins[name] = twin.to(device, dtype)
    ours = ours.to(device, dtype)

    g = torch.Generator().manual_seed(1)
    side = args.size // 8
    x = torch.randn(args.batch, cfg.unet.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.full((args.batch,), 500, device=device)
    ctx = torch.randn(args.batch, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    ids = torch.randint(0, cfg.clip.vocab_size, (args.batch, 77), generator=g).to(device)
    z = x[:, :4]
    cases = {
        "unet": (lambda: ours.unet(x, t, ctx), lambda: twins["unet"](x, t, encoder_hidden_states=ctx)),
        "vae decode": (lambda: ours.vae.decode(z), lambda: twins["vae"].decode(z)),
        "text encoder": (lambda: ours.text_encoder(ids), lambda: twins["text_encoder"](input_ids=ids)),
    }
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {dtype}, "
        f"torch {torch.__version__}, config {cfg.name}, {args.size}x{args.size}, batch {args.batch}, "
        f"median of {args.repeat}"
    )
    print("| network | sdbatch s | reference s | ratio |\n|---|---|---|---|")
    with torch.inference_mode():
        for name, (mine, theirs) in cases.items():
            mine(), theirs()  # warm-up: allocator, kernel selection
            a, b = [], []
            for _ in range(args.repeat):
                a.append(timed(mine, device))
                b.append(timed(theirs, device))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {name} | {ma:.4f} | {mb:.4f} | {ma / mb:.2f} |")


if __name__ == "__main__":
    main()
