"""One spawned worker process per device, each with its own pipeline (`--devices cuda:0,cuda:1`)."""

import contextlib
import queue
import signal
import time
from collections.abc import Callable
from typing import Any

from .worker import ModelSpec, build_renderer

LOAD_TIMEOUT = 900  # seconds a worker may take to load its model


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
            outbox.put(("done", worker, batch_id, render(batch)))
        except Exception as e:
            outbox.put(("failed", worker, batch_id, f"{type(e).__name__}: {e}"))


class ProcessPool:
    def __init__(self, specs: list[ModelSpec], note: Callable[[str], None] = lambda m: None):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.note = note
        self.names = [s.device for s in specs]
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in specs]
        self.procs = [
            ctx.Process(target=_worker, args=(spec, self.inboxes[i], self.outbox, i), daemon=True)
            for i, spec in enumerate(specs)
        ]
        for p in self.procs:
            p.start()
        self.alive = set(range(len(specs)))
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Every worker has loaded its model (or failed to): rendering time starts after this."""
        waiting, deadline = set(self.alive), time.monotonic() + LOAD_TIMEOUT
        while waiting and time.monotonic() < deadline:
            for kind, w, *rest in self._events(0.5):
                waiting.discard(w)
                if kind == "dead":
                    self.alive.discard(w)
                    self.note(f"worker {w} ({self.names[w]}) failed: {rest[0]}")
            for w in list(waiting):
                if not self.procs[w].is_alive():
                    waiting.discard(w)
                    self.alive.discard(w)
                    self.note(f"worker {w} on {self.names[w]} exited while loading the model")

    def _events(self, timeout: float) -> list[tuple[Any, ...]]:
        try:
            return [self.outbox.get(timeout=timeout)]
        except queue.Empty:
            return []

    def submit(self, worker: int, batch_id: int, batch: list) -> None:
        self.inboxes[worker].put((batch_id, batch))

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        events = self._events(timeout)
        if not events:  # quiet: has anyone died without a word (SIGKILL, segfault)?
            events = [
                ("dead", w, f"exit code {self.procs[w].exitcode}") for w in self.alive if not self.procs[w].is_alive()
            ]
        for event in events:
            if event[0] == "dead":
                self.procs[event[1]].join(timeout=5)
        return events

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
