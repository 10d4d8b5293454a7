"""sdbatch against diffusers on one GPU, same random SD1.5-size weights, in one process and one run.

    python bench/gpu.py                  # CUDA: 64 images, 512x512, 30 steps Euler, CFG 7.5
    python bench/gpu.py --images 16      # a shorter run
    python bench/gpu.py                  # without CUDA: a small labelled CPU run (tiny config),
                                         # which only proves the benchmark still works

Variants, each rendering the same prompt x seed grid from the same weights:
  (a) diffusers StableDiffusionPipeline, eager (SDPA attention), fp16, batch B
  (b) diffusers compiled as its docs advise: UNet and VAE in channels_last, torch.compile of the
      UNet (mode max-autotune, fullgraph), fused QKV projections, fp16
  (c) sdbatch Pipeline at its best settings (fp16, channels_last, torch.compile, CUDA graphs)
For each: images/s at batch B, seconds per image at batch 1, peak GPU memory, and, for sdbatch,
the ratio to (b) and the fraction of the arithmetic floor (FLOPs per image / dense fp16 peak).
Needs the test extra (diffusers). Compile time is reported apart: a warm-up batch of each shape
runs before timing.
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import diffusers_scheduler, diffusers_unet, diffusers_vae, for_twin, request, transformers_clip

from sdbatch.convert import to_diffusers
from sdbatch.models import build_model
from sdbatch.pipeline import Pipeline, Tuning
from sdbatch.tokenizer import Tokenizer, bundled_tokenizer

PROMPTS = ["a lighthouse at dusk, oil painting", "a red fox in the snow, photograph", "a city street at night"]
# UNet FLOPs per CFG step pair (two rows) at 512^2 for SD1.5, and a VAE decode; H100 SXM dense fp16
UNET_PAIR_TFLOP, VAE_TFLOP, H100_TFLOPS = 1.61, 2.5, 989.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def twins(model, cfg):
    state = to_diffusers(model.state_dict(), cfg)
    parts = {}
    for name, make in (("unet", diffusers_unet), ("vae", diffusers_vae), ("text_encoder", transformers_clip)):
        twin = make(cfg)
        twin.load_state_dict(for_twin(twin, state[name]), strict=True)
        parts[name] = twin.eval()
    return parts


def diffusers_pipeline(model, cfg, device, dtype, compiled: bool):
    from diffusers import StableDiffusionPipeline

    parts = twins(model, cfg)
    pipe = StableDiffusionPipeline(
        **parts,
        tokenizer=bundled_tokenizer(),
        scheduler=diffusers_scheduler("euler", False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        mode = "max-autotune" if device.type == "cuda" else None
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    return pipe


def run_diffusers(pipe, grid, batch, size, steps, device):
    for i in range(0, len(grid), batch):
        chunk = grid[i : i + batch]
        pipe(
            [p for p, _ in chunk],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
        )


def run_ours(pipe, grid, batch, size, steps, device):
    for i in range(0, len(grid), batch):
        chunk = grid[i : i + batch]
        pipe.render(
            [request(p, seed=s, steps=steps, sampler="euler", cfg=7.5, width=size, height=size) for p, s in chunk]
        )


def measure(name, make, runner, grid, batch, size, steps, device, rows):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pipe = make()
    start = time.perf_counter()
    runner(pipe, grid[:batch], batch, size, steps, device)  # warm-up: compiles this batch shape
    runner(pipe, grid[:1], 1, size, steps, device)  # and the batch-1 shape
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    runner(pipe, grid, batch, size, steps, device)
    sync(device)
    throughput = len(grid) / (time.perf_counter() - start)
    start = time.perf_counter()
    runner(pipe, grid[:2], 1, size, steps, device)
    sync(device)
    single = (time.perf_counter() - start) / 2
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    rows.append((name, throughput, single, peak, warm))
    print(f"  {name}: {throughput:.2f} img/s, {single:.2f} s/img at batch 1, warm-up {warm:.0f} s", file=sys.stderr)
    del pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    config = "sd15" if cuda else "tiny"
    images = args.images or (64 if cuda else 8)
    batch = args.batch or (16 if cuda else 4)
    steps = args.steps or (30 if cuda else 6)
    size = args.size or (512 if cuda else 64)
    grid = [(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(images)]

    torch.manual_seed(0)
    model = build_model(config)
    cfg = model.config
    tokenizer = Tokenizer(bundled_tokenizer(), "bundled")
    rows: list = []
    shape = (grid, batch, size, steps, device, rows)
    measure("diffusers eager", lambda: diffusers_pipeline(model, cfg, device, dtype, False), run_diffusers, *shape)
    measure("diffusers compiled", lambda: diffusers_pipeline(model, cfg, device, dtype, True), run_diffusers, *shape)
    fast = Tuning(channels_last=True, compile=True, cuda_graphs=cuda)

    def make_ours():
        return Pipeline(_copy(model, config), tokenizer, device, dtype, fast)

    name = "sdbatch (fp16, channels_last, compile, CUDA graphs)" if cuda else "sdbatch (channels_last, compile)"
    measure(name, make_ours, run_ours, *shape)

    label = torch.cuda.get_device_name(0) if cuda else "CPU (tiny config: a smoke run, not a performance figure)"
    print(
        f"\n{label}; torch {torch.__version__}; {config}, {size}x{size}, {steps} steps Euler, CFG 7.5, "
        f"{images} images, batch {batch}, {str(dtype).replace('torch.', '')}\n"
    )
    print("| variant | img/s | s/img at batch 1 | peak GiB | warm-up s |")
    print("|---|---|---|---|---|")
    for name, throughput, single, peak, warm in rows:
        print(f"| {name} | {throughput:.2f} | {single:.2f} | {peak:.1f} | {warm:.0f} |")
    ours, compiled = rows[2][1], rows[1][1]
    print(f"\nsdbatch / diffusers compiled: {ours / compiled:.2f}x")
    if cuda and config == "sd15" and size == 512:
        floor = (UNET_PAIR_TFLOP * steps + VAE_TFLOP) / H100_TFLOPS
        print(f"fraction of the FLOP floor ({floor * 1000:.0f} ms/img at {H100_TFLOPS:.0f} TFLOPS): {ours * floor:.1%}")


def _copy(model, config):
    twin = build_model(config)
    twin.load_state_dict(model.state_dict())
    return twin


if __name__ == "__main__":
    main()
