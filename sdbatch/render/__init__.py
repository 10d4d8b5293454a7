"""The torch seam: where batches render. One device renders in this process, several in one worker
process each, or Ray actors across a cluster; one dispatcher (dispatch.Executor) serves them all.
The main process always writes the files, so names, metadata and the manifest are the same
whatever renders the pixels. Nothing here imports torch until a renderer is built."""

import os
from collections.abc import Callable
from typing import Any

from .devices import auto_batch_size, parse_devices, with_backoff
from .dispatch import Executor, InlinePool
from .worker import ModelSpec, build_renderer


def make_executor(
    model_path: str,
    vae: str | None,
    devices: str,
    backend: str = "local",
    ray_address: str | None = None,
    tuning: Any = None,
    note: Callable[[str], None] = lambda m: None,
) -> Executor:
    """One device renders here, several in worker processes, and `backend="ray"` on Ray actors."""
    if backend == "ray":
        from .ray import RayPool, resolve_address

        address = resolve_address(ray_address)  # a typo is said before torch or Ray is imported
        names = parse_devices(devices)
        pool = RayPool(ModelSpec(model_path, vae, names[0], tuning=tuning), address, len(names), note)
        return Executor(pool, pool.device, note)
    names = parse_devices(devices)
    if len(names) == 1:
        spec = ModelSpec(model_path, vae, names[0], tuning=tuning)
        return Executor(InlinePool(build_renderer(spec), names[0]), names[0], note, prefetch=1)
    from .process import ProcessPool

    cpu_workers = names.count("cpu")
    threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
    specs = [ModelSpec(model_path, vae, d, threads if d == "cpu" else None, tuning) for d in names]
    return Executor(ProcessPool(specs, note), names[0], note)


def inline_executor(render: Callable[[list], Any]) -> Executor:
    """An executor around a plain render function (tests replace the model with one)."""
    return Executor(InlinePool(render, "cpu"), "cpu", prefetch=1)


__all__ = [
    "Executor",
    "ModelSpec",
    "auto_batch_size",
    "build_renderer",
    "inline_executor",
    "make_executor",
    "parse_devices",
    "with_backoff",
]
