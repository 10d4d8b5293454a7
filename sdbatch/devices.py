"""Where batches render: in this process (one device), in one worker process per device, or on
Ray actors across a cluster. The main process always writes the files, so names, metadata and the
manifest are the same whatever renders the pixels.

Every executor has `map(batches, stop)`: it hands batches out as devices become free (a slow
device simply takes fewer), yields `(batch, results)` as they finish, stops handing out new ones
once `stop()` is true and still yields those in flight.
"""

import contextlib
import queue
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import InputError

Results = list[tuple[Any, str | None]]  # per task: (PIL image or None, error or None)
Render = Callable[[list], Results]
PREFETCH = 2  # batches assigned to a worker at once: one rendering, one waiting


def parse_devices(text: str) -> list[str]:
    """`auto` -> every visible GPU, else the CPU; `cpu`, `cuda`, `cuda:0,cuda:2`, `cpu,cpu` (two
    CPU workers) or `cpu*2`."""
    import torch

    text = (text or "auto").strip().lower()
    if text == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        name, _, times = item.partition("*")
        if not times.isdigit() and times:
            raise InputError(f"--devices: {item!r}: write a device, or device*N for N workers on it")
        if name == "cuda":
            name = "cuda:0"
        if name != "cpu" and not (name.startswith("cuda:") and name[5:].isdigit()):
            raise InputError(f"--devices: unknown device {name!r}; use auto, cpu, cuda or cuda:N (comma-separated)")
        if name.startswith("cuda:"):
            if not torch.cuda.is_available():
                raise InputError(f"--devices: {name} asked for, but torch sees no CUDA GPU here")
            if int(name[5:]) >= torch.cuda.device_count():
                raise InputError(
                    f"--devices: {name} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"
                )
        devices.extend([name] * int(times or 1))
    if not devices:
        raise InputError("--devices: empty list")
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


# ----------------------------------------------------------------------------------------------------
# the renderer every backend builds on its device


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its own pipeline: paths and the device, nothing heavy."""

    path: str
    vae: str | None
    device: str
    threads: int | None = None
    fast: Any = None  # pipeline.FastPath (imported lazily: this module stays free of torch at import)


def build_renderer(spec: ModelSpec) -> Render:
    import torch
    from PIL import Image

    from .pipeline import FastPath, Pipeline
    from .runner import request_for

    if spec.threads:
        torch.set_num_threads(spec.threads)
    dtype = torch.float16 if spec.device.startswith("cuda") else torch.float32
    fast = spec.fast or FastPath()
    pipeline = Pipeline.from_file(spec.path, vae=spec.vae, device=spec.device, dtype=dtype, fast=fast)
    images: dict[str, Image.Image] = {}

    def image(path: str | None) -> Image.Image | None:
        if path is None:
            return None
        if path not in images:
            with Image.open(path) as im:
                im.load()
                images[path] = im.copy()
        return images[path]

    def render(batch: list) -> Results:
        requests = [request_for(t, image(t.init_image), image(t.mask)) for t in batch]
        return [(r.image, r.error) for r in pipeline.render(requests)]

    return with_backoff(render)


# ----------------------------------------------------------------------------------------------------
# executors


class LocalExecutor:
    """One device, in this process: no extra process, no pickling."""

    def __init__(self, render: Render):
        self.render = render

    def map(self, batches: Iterable[list], stop: Callable[[], bool]) -> Iterator[tuple[list, Results]]:
        for batch in batches:
            if stop():
                return
            try:
                results = self.render(batch)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a batch that crashed: its images fail, the others go on
                results = [(None, f"{type(e).__name__}: {e}")] * len(batch)
            yield batch, results

    def close(self) -> None:
        pass


def _worker(spec: ModelSpec, inbox, outbox, worker: int) -> None:
    """A worker process: build the pipeline once, then render what the main process sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    try:
        render = build_renderer(spec)
    except BaseException as e:
        outbox.put(("dead", worker, f"could not load the model on {spec.device}: {type(e).__name__}: {e}"))
        return
    outbox.put(("ready", worker, spec.device))
    while True:
        message = inbox.get()
        if message is None:
            return
        batch_id, batch = message
        try:
            results = render(batch)
        except Exception as e:
            results = [(None, f"{type(e).__name__}: {e}")] * len(batch)
        outbox.put(("done", worker, batch_id, results))


class ProcessExecutor:
    """One spawned worker process per device, each with its own pipeline. Batches go to whichever
    worker has room; a worker that dies has its batches retried once on the others."""

    def __init__(self, specs: list[ModelSpec], note: Callable[[str], None] = lambda m: None):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.note = note
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in specs]
        self.procs = [
            ctx.Process(target=_worker, args=(spec, self.inboxes[i], self.outbox, i), daemon=True)
            for i, spec in enumerate(specs)
        ]
        for p in self.procs:
            p.start()
        self.alive = set(range(len(specs)))
        self.devices = [s.device for s in specs]
        self._wait_ready()

    def _wait_ready(self, timeout: float = 900) -> None:
        """Every worker has loaded its model (or failed to): rendering time starts after this."""
        waiting, deadline = set(self.alive), time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            try:
                kind, w, *rest = self.outbox.get(timeout=0.5)
            except queue.Empty:
                for w in list(waiting):
                    if not self.procs[w].is_alive():
                        waiting.discard(w)
                        self.alive.discard(w)
                        self.note(f"worker {w} on {self.devices[w]} exited while loading the model")
                continue
            waiting.discard(w)
            if kind == "dead":
                self.alive.discard(w)
                self.note(f"worker {w} ({self.devices[w]}) failed: {rest[0]}")

    def map(self, batches: Iterable[list], stop: Callable[[], bool]) -> Iterator[tuple[list, Results]]:
        pending = iter(enumerate(batches))
        retry: list[tuple[int, list]] = []
        attempts: dict[int, int] = {}
        assigned: dict[int, dict[int, list]] = {w: {} for w in self.alive}
        exhausted = False

        def next_batch() -> tuple[int, list] | None:
            nonlocal exhausted
            if retry:
                return retry.pop(0)
            if exhausted or stop():
                return None
            try:
                return next(pending)
            except StopIteration:
                exhausted = True
                return None

        def fill() -> None:
            for w in sorted(self.alive, key=lambda w: len(assigned[w])):
                while len(assigned[w]) < PREFETCH:
                    item = next_batch()
                    if item is None:
                        return
                    assigned[w][item[0]] = item[1]
                    self.inboxes[w].put(item)

        while True:
            fill()
            if not self.alive:  # nobody left to render: what is left fails, nothing is silently dropped
                for _, batch in retry:
                    yield batch, [(None, "every worker died")] * len(batch)
                retry.clear()
                while (item := next_batch()) is not None:
                    yield item[1], [(None, "every worker died")] * len(item[1])
                return
            if not any(assigned[w] for w in assigned):
                if not retry:
                    return
                continue
            try:
                message = self.outbox.get(timeout=0.5)
            except queue.Empty:
                for w in list(self.alive):
                    if not self.procs[w].is_alive():
                        yield from self._lost(w, assigned, attempts, retry)
                continue
            kind, w = message[0], message[1]
            if kind == "done":
                _, _, batch_id, results = message
                batch = assigned[w].pop(batch_id)
                yield batch, results
            elif kind == "dead":
                self.note(f"worker {w} ({self.devices[w]}) failed: {message[2]}")
                self.procs[w].join(timeout=5)
                yield from self._lost(w, assigned, attempts, retry)

    def _lost(self, w: int, assigned, attempts, retry) -> Iterator[tuple[list, Results]]:
        """A worker died: each batch it held is retried once elsewhere, then failed."""
        self.alive.discard(w)
        code = self.procs[w].exitcode
        self.note(f"worker {w} on {self.devices[w]} died (exit code {code}); its batches go to the others")
        for batch_id, batch in sorted(assigned[w].items()):
            attempts[batch_id] = attempts.get(batch_id, 0) + 1
            if attempts[batch_id] > 1 or not self.alive:
                yield batch, [(None, f"worker on {self.devices[w]} died (exit code {code})")] * len(batch)
            else:
                retry.append((batch_id, batch))
        assigned[w].clear()

    def close(self) -> None:
        for w in self.alive:
            with contextlib.suppress(OSError, ValueError):
                self.inboxes[w].put(None)
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for q in [*self.inboxes, self.outbox]:
            q.close()
            q.cancel_join_thread()
