"""What hires fix costs, against rendering straight at the big size, with the demo model.

    python bench/hires.py                 # CPU: 32x32 -> 64x64, batch 4, median of 3 runs
    python bench/hires.py --device cuda   # the same on a GPU (fp16)

Rows, each a batch of `--batch` images at the same seeds, timed after one warm-up render:
  direct    txt2img at the target size, `steps` steps (what users avoid: repeated subjects at 2x)
  latent    hires fix: `steps` at the base size, latent upscale, `hires_steps` at the target
  lanczos   the same with the decoded image resized by Lanczos and encoded again
  model     the same with the tiny random RRDBNet of jobs/upscalers (tiled, 192 px)
The ratio is each row's time over `direct`. Prints one markdown table.
"""

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from sdbatch.addons.library import Addons, UpscalerUse
from sdbatch.checkpoints import file_sha256
from sdbatch.pipeline import Pipeline, Request
from sdbatch.recipe import Recipe

TINY = Path(__file__).resolve().parent.parent / "jobs" / "upscalers" / "tiny-rrdb-x2.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hires-steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = Pipeline.from_file("demo", device=args.device, dtype=dtype)
    base = Recipe(prompt="a big red circle on a blue background", size=(32, 32), steps=args.steps, cfg=5.0)
    hires = replace(base, hires_scale=2.0, strength=0.5, hires_steps=args.hires_steps)
    model = Addons(upscaler=UpscalerUse("tiny-rrdb-x2", str(TINY), file_sha256(TINY)))
    rows = {
        "direct": (replace(base, size=(64, 64)), Addons()),
        "latent": (hires, Addons()),
        "lanczos": (replace(hires, hires_upscaler="lanczos"), Addons()),
        "model": (replace(hires, hires_upscaler="tiny-rrdb-x2"), model),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for recipe, addons in rows.values():  # warm-up: first-call costs are not hires fix's
        pipe.render([Request(replace(recipe, seed=0), addons=addons)])
    for _ in range(args.repeat):
        for name, (recipe, addons) in rows.items():  # interleaved: load drifts hit every row alike
            batch = [Request(replace(recipe, seed=s), addons=addons) for s in range(args.batch)]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            pipe.render(batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - began)
    direct = statistics.median(times["direct"])
    print(
        f"demo model, {args.device}, batch {args.batch}, {args.steps} steps (+{args.hires_steps} hires), "
        f"median of {args.repeat}\n"
    )
    print("| row | s per batch | img/s | vs direct 64x64 |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.3f} | {args.batch / median:.2f} | {median / direct:.2f} |")


if __name__ == "__main__":
    main()
