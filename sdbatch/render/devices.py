"""Devices: which ones a `--devices` value names, how large a batch fits, and out-of-memory back-off."""

import re
from collections.abc import Callable
from typing import Any

from ..errors import InputError

Results = list[tuple[Any, str | None]]  # per task: (PIL image or None, error or None)
Render = Callable[[list], Results]


MAX_WORKERS = 64  # workers one --devices value may ask for, all devices together


def device_counts(text: str | None) -> list[tuple[str, int]]:
    """The syntax of a `--devices` value, torch-free (jobs check their `devices:` with it):
    `auto`, or comma-separated `cpu`, `cuda`, `cuda:N`, each optionally `*K` for K workers on it.
    Returns (name, workers) pairs, `cuda` spelled `cuda:0`; InputError for anything else."""
    text = (text or "auto").strip().lower()
    if text == "auto":
        return [("auto", 1)]
    out: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        m = re.fullmatch(r"([a-z0-9:]*?)\s*(?:\*\s*([0-9]+))?", item)
        if m is None:
            raise InputError(f"--devices: {_shown(item)}: write a device, or device*N for N workers on it")
        name, times = m[1], m[2]
        if name == "cuda":
            name = "cuda:0"
        if name != "cpu" and not re.fullmatch(r"cuda:[0-9]{1,4}", name):
            raise InputError(
                f"--devices: unknown device {_shown(name)}; use auto, cpu, cuda or cuda:N (comma-separated)"
            )
        count = int(times) if times is not None and len(times) <= 6 else (1 if times is None else MAX_WORKERS + 1)
        if count < 1:
            raise InputError(f"--devices: {_shown(item)}: at least one worker per device")
        out.append((name, count))
        if sum(n for _, n in out) > MAX_WORKERS:
            raise InputError(f"--devices: {_shown(text)}: more than {MAX_WORKERS} workers")
    return out


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:39] + "…")


def parse_devices(text: str) -> list[str]:
    """`auto` -> every visible GPU, else the CPU; `cpu`, `cuda`, `cuda:0,cuda:2`, `cpu,cpu` (two
    CPU workers) or `cpu*2`."""
    counts = device_counts(text)  # the syntax first, before torch is imported
    import torch

    if counts == [("auto", 1)]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(min(count, MAX_WORKERS))] or ["cpu"]
    devices: list[str] = []
    for name, times in counts:
        if name.startswith("cuda:"):
            if not torch.cuda.is_available():
                raise InputError(f"--devices: {name} asked for, but torch sees no CUDA GPU here")
            if int(name[5:]) >= torch.cuda.device_count():
                raise InputError(
                    f"--devices: {name} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"
                )
        devices.extend([name] * times)
    return devices


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def with_backoff(render: Render) -> Render:
    """On out-of-memory, render the batch in halves (and keep that smaller size for later batches)
    instead of dying; a single image that does not fit fails alone."""
    limit = [None]

    def run(batch: list) -> Results:
        if limit[0] is not None and len(batch) > limit[0]:
            return [r for i in range(0, len(batch), limit[0]) for r in run(batch[i : i + limit[0]])]
        try:
            return render(batch)
        except Exception as e:
            if not is_oom(e):
                raise
            _free_cuda()
            if len(batch) == 1:
                return [(None, f"out of memory even at batch size 1: {e}")]
            half = max(1, len(batch) // 2)
            limit[0] = half if limit[0] is None else min(limit[0], half)
            return run(batch[:half]) + run(batch[half:])

    run.limit = limit  # type: ignore[attr-defined]  # for tests and reporting
    return run


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def auto_batch_size(device: str) -> int:
    """Batches large enough to keep the device busy without running out of memory."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(1, min(16, int(free / 2**30 / 2.5)))  # ~2.5 GiB per SD1.5 image at 512^2 in fp16
    return 8
