"""One spawned worker process per device, each with its own pipeline (`--devices cuda:0,cuda:1`).

Workers are helpers of the main process and never outlive it or act on their own:
- they die with it, even when it is killed with SIGKILL: on Linux the kernel sends them SIGKILL
  (PR_SET_PDEATHSIG), everywhere a thread watches the parent and exits when it is gone, so no
  orphan keeps a GPU or gigabytes of weights (multiprocessing's resource tracker then exits too);
- they ignore SIGINT and SIGTERM from their first instruction on: Ctrl-C and a scheduler's SIGTERM
  reach the whole process group, and it is the main process that decides how to stop (finish the
  batches in flight, then close the pool: a sentinel, SIGKILL after a grace period);
- each answers on its own pipe, so a worker killed mid-message (the OOM killer) breaks only its
  own pipe and is seen as dead at once, and no shared queue is left with its lock held.
A model that loads in no worker is bad input (InputError, exit 2), as with one device.
"""

import atexit
import contextlib
import ctypes
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import InputError
from .worker import ModelSpec, build_renderer, load_error

LOAD_TIMEOUT = 900  # seconds a worker may take to load its model
CLOSE_GRACE = 10.0  # seconds workers get to finish a batch when the pool closes, before SIGKILL
PARENT_CHECK = 0.5  # seconds between a worker's looks at its parent
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _worker(packed: bytes, inbox, outbox: Connection, worker: int, parent: int, pdeathsig: bool) -> None:
    """A worker process: build the pipeline once, then render what the main process sends. The spec
    comes pickled (bytes): unpickling it imports torch (its Tuning), seconds during which a worker
    whose parent was SIGKILLed would live on; it is unpickled once the worker dies with its parent."""
    for s in STOP_SIGNALS:  # already ignored since exec (see _signals_ignored); said again for clarity
        signal.signal(s, signal.SIG_IGN)
    _die_with(parent, pdeathsig)
    spec: ModelSpec | None = None
    try:
        spec = pickle.loads(packed)
        render = build_renderer(spec)
    except BaseException as e:
        why = load_error(spec, e) if spec is not None else f"could not start a worker: {type(e).__name__}: {e}"
        outbox.send(("unloadable", worker, why))
        return
    outbox.send(("ready", worker, spec.device))
    while (message := inbox.get()) is not None:
        batch_id, batch = message
        try:
            outcome: tuple = ("done", worker, batch_id, render(batch))
        except Exception as e:
            outcome = ("failed", worker, batch_id, f"{type(e).__name__}: {e}")
        outbox.send(outcome)


def _die_with(parent: int, pdeathsig: bool) -> None:
    """Exit when the main process does, however it ends. PR_SET_PDEATHSIG fires when the *thread*
    that started this process exits, so the pool asks for it only when started from the main thread;
    the watching thread covers the other cases and other systems."""
    if pdeathsig and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="sdbatch-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """An orphan is adopted by init (or a subreaper), so a changed parent pid means the parent died."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK)
    os._exit(1)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Start children with SIGINT and SIGTERM ignored: an ignored signal stays ignored across exec
    (and Python then installs no KeyboardInterrupt handler), so no signal can kill a worker before it
    runs a line of ours. Meanwhile the signals are blocked here, and reach this process's own
    handlers when they are put back. Only the main thread may set handlers; elsewhere, start as is."""
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, STOP_SIGNALS):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _how_it_ended(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class ProcessPool:
    def __init__(self, specs: list[ModelSpec], note: Callable[[str], None] = lambda m: None):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.note = note
        self.names = [s.device for s in specs]
        self.inboxes = [ctx.Queue() for _ in specs]
        pipes = [ctx.Pipe(duplex=False) for _ in specs]  # (what we read, what the worker writes)
        self.outboxes: dict[Connection, int] = {r: i for i, (r, _) in enumerate(pipes)}  # the open ones
        pdeathsig = threading.current_thread() is threading.main_thread()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(pickle.dumps(spec), self.inboxes[i], pipes[i][1], i, os.getpid(), pdeathsig),
                name=f"sdbatch-worker-{i}",
                daemon=True,
            )
            for i, spec in enumerate(specs)
        ]
        self.alive = set(range(len(specs)))
        self.closed = False
        atexit.register(self.close)  # before multiprocessing's own exit hook, which would wait forever
        try:
            with _signals_ignored():
                for p in self.procs:
                    p.start()
            for _, w in pipes:
                w.close()  # the worker holds the only write end: its exit reads as end-of-file here
            self._wait_ready()
        except BaseException:
            self.close(grace=0)
            raise

    def _wait_ready(self) -> None:
        """Every worker has loaded its model (or failed to): rendering time starts after this. If none
        could, the model is bad input, said in one line as the single-device path says it."""
        loading, failed = set(self.alive), {}
        deadline = time.monotonic() + LOAD_TIMEOUT
        while loading and (left := deadline - time.monotonic()) > 0:
            for kind, w, *rest in self._events(min(left, 1.0)):
                if w not in loading:
                    continue  # the end-of-file after a worker said it could not load
                loading.discard(w)
                if kind == "unloadable":
                    failed[w] = rest[0]
                elif kind == "dead":
                    failed[w] = f"the worker on {self.names[w]} exited while loading the model ({rest[0]})"
        self.alive -= failed.keys()
        if not self.alive:
            raise InputError(failed[min(failed)])
        for w, reason in sorted(failed.items()):
            self.note(f"worker {w} ({self.names[w]}) failed: {reason}")

    def _events(self, timeout: float) -> list[tuple[Any, ...]]:
        events = []
        for conn in wait(list(self.outboxes), timeout):
            try:
                events.append(conn.recv())
            except (EOFError, OSError):  # the worker is gone: said once, then its pipe is closed
                w = self.outboxes.pop(conn)
                conn.close()
                self.procs[w].join(timeout=5)
                events.append(("dead", w, _how_it_ended(self.procs[w])))
        return events

    def submit(self, worker: int, batch_id: int, batch: list) -> None:
        self.inboxes[worker].put((batch_id, batch))

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        """Events for the dispatcher; a worker that loads only after LOAD_TIMEOUT says "ready" (not
        news) or that it could not load (then it is dead)."""
        events = []
        for event in self._events(timeout):
            if event[0] == "unloadable":
                events.append(("dead", *event[1:]))
            elif event[0] != "ready":
                events.append(event)
        return events

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """A sentinel to each worker, `grace` seconds to finish what it renders, then SIGKILL (never
        SIGTERM: workers ignore it). Idempotent; also run at exit."""
        if self.closed:
            return
        started = [(w, p) for w, p in enumerate(self.procs) if p.pid is not None]
        for w, p in started:
            if p.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    self.inboxes[w].put(None)
        deadline = time.monotonic() + grace
        for _, p in started:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for q in self.inboxes:
            q.close()
            q.cancel_join_thread()
        for conn in self.outboxes:
            conn.close()
        self.outboxes.clear()
        self.closed = True  # only now: interrupted halfway, it runs again at exit
        atexit.unregister(self.close)
