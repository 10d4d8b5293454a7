"""What merging a LoRA costs at SD 1.5 size: read + merge, switch to another set, restore.

    python bench/lora.py                     # CPU, fp32, rank 32 on every layer a kohya LoRA trains
    python bench/lora.py --device cuda       # fp16 on a GPU

The LoRA is random, in kohya's key format, on the layers kohya's default `networks/lora.py`
trains for SD 1.x (UNet attention and feed-forward, proj_in/proj_out; text-encoder attention and
MLP): the usual civitai LoRA shape. A job pays one merge per LoRA set per worker (batches are taken
set by set), so this is a per-set cost, never a per-step one. Prints one markdown table.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdbatch.addons.lora import model_names, read_lora
from sdbatch.addons.merge import Merger
from sdbatch.models import build_model

KOHYA_LAYERS = ("attn1", "attn2", "ff.net", "proj_in", "proj_out", "self_attn", "mlp")


def write_lora(model, path: Path, rank: int, seed: int) -> int:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, key in model_names(shapes, model.config.unet).items():
        ldm = any(b in name for b in ("input_blocks", "middle_block", "output_blocks"))
        if not name.startswith(("lora_unet_", "lora_te_text_model_")) or ldm:
            continue
        if not any(layer in key for layer in KOHYA_LAYERS):
            continue
        out_features, in_features = shapes[key][:2]
        kernel = shapes[key][2:]
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, *kernel, generator=generator) * 0.01
        tensors[f"{name}.lora_up.weight"] = (
            torch.randn(out_features, rank, *[1] * len(kernel), generator=generator) * 0.01
        )
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, path)
    return len(tensors) // 3


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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model("sd15").to(device=device, dtype=dtype).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"lora{i}.safetensors" for i in (0, 1)]
        layers = [write_lora(model, p, args.rank, seed) for seed, p in enumerate(paths)]
        size = paths[0].stat().st_size / 2**20
        merger = Merger(model)
        read = [0.0, 0.0]
        files = []
        for i, p in enumerate(paths):
            start = time.perf_counter()
            files.append(read_lora(p, shapes, model.config.unet))
            read[i] = time.perf_counter() - start
        first = timed(lambda: merger.apply([(files[0], 0.8, 0.8)]), device)
        again = timed(lambda: merger.apply([(files[0], 0.8, 0.8)]), device)
        switch = timed(lambda: merger.apply([(files[1], 0.5, 0.5)]), device)
        both = timed(lambda: merger.apply([(files[0], 0.8, 0.8), (files[1], 0.5, 0.5)]), device)
        restore = timed(merger.restore, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"SD 1.5 ({name}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"kohya LoRA rank {args.rank}: {layers[0]} layers, {size:.0f} MB fp16\n"
    )
    print("| step | seconds |\n|---|---|")
    for label, seconds in (
        ("read the file's header and map its keys", read[0]),
        ("first merge (tensors read, originals kept, W += m·ΔW)", first),
        ("the same set again (no-op)", again),
        ("switch to another LoRA (restore + merge)", switch),
        ("switch to a set of two LoRAs", both),
        ("restore the originals", restore),
    ):
        print(f"| {label} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
