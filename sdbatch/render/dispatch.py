"""One dispatcher for every backend: it hands batches to whichever worker has room (a slow device
simply takes fewer), yields `(batch, results)` as they finish, retries a dead worker's batches once
on the others, and fails a batch with its reason when nobody can render it. Nothing is dropped.

A backend is a Pool: numbered workers that accept `submit(worker, batch_id, batch)` and report
events from `poll(timeout)`: ("done", worker, batch_id, results), ("failed", worker, batch_id,
reason) when the batch crashed, or ("dead", worker, reason).
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from .devices import Results

PREFETCH = 2  # batches assigned to a worker at once: one rendering, one waiting


class Pool(Protocol):
    names: list[str]  # one per worker, for messages
    alive: set[int]

    def submit(self, worker: int, batch_id: int, batch: list) -> None: ...
    def poll(self, timeout: float) -> list[tuple[Any, ...]]: ...
    def close(self) -> None: ...


class Executor:
    """`map(batches, stop)` over a pool: stops handing out new batches once `stop()` is true and
    still yields those in flight."""

    def __init__(self, pool: Pool, device: str, note: Callable[[str], None] = lambda m: None, prefetch: int = PREFETCH):
        self.pool, self.device, self.note, self.prefetch = pool, device, note, prefetch

    def map(self, batches: Iterable[list], stop: Callable[[], bool]) -> Iterator[tuple[list, Results]]:
        pool = self.pool
        pending = iter(enumerate(batches))
        retry: list[tuple[int, list]] = []
        attempts: dict[int, int] = {}
        assigned: dict[int, dict[int, list]] = {w: {} for w in pool.alive}

        def next_batch() -> tuple[int, list] | None:
            if retry:
                return retry.pop(0)
            return None if stop() else next(pending, None)

        while True:
            for w in sorted(pool.alive, key=lambda w: len(assigned[w])):
                while len(assigned[w]) < self.prefetch and (item := next_batch()) is not None:
                    assigned[w][item[0]] = item[1]
                    pool.submit(w, *item)
            if not pool.alive:  # nobody left to render: what is left fails, nothing is silently dropped
                while (item := next_batch()) is not None:
                    yield item[1], [(None, "every worker died")] * len(item[1])
                return
            if not any(assigned.values()):
                return
            for event in pool.poll(0.5):
                if event[0] in ("done", "failed"):
                    _, w, batch_id, outcome = event
                    if batch_id not in assigned.get(w, {}):
                        continue  # a late answer for a batch already given up
                    batch = assigned[w].pop(batch_id)
                    yield batch, outcome if event[0] == "done" else [(None, outcome)] * len(batch)
                elif event[1] in self.pool.alive:
                    yield from self._lost(event[1], event[2], assigned, attempts, retry)

    def _lost(self, w: int, reason: str, assigned, attempts, retry) -> Iterator[tuple[list, Results]]:
        """A worker died: each batch it held is retried once elsewhere, then failed."""
        self.pool.alive.discard(w)
        self.note(f"worker {w} on {self.pool.names[w]} died ({reason}); its batches go to the others")
        for batch_id, batch in sorted(assigned[w].items()):
            attempts[batch_id] = attempts.get(batch_id, 0) + 1
            if attempts[batch_id] > 1 or not self.pool.alive:
                yield batch, [(None, f"worker on {self.pool.names[w]} died ({reason})")] * len(batch)
            else:
                retry.append((batch_id, batch))
        assigned[w].clear()

    def close(self) -> None:
        self.pool.close()


class InlinePool:
    """One device, in this process: no extra process, no pickling. A batch renders inside `poll`."""

    def __init__(self, render: Callable[[list], Results], name: str = "this process"):
        self.render, self.names, self.alive = render, [name], {0}
        self.queue: list[tuple[int, list]] = []

    def submit(self, worker: int, batch_id: int, batch: list) -> None:
        self.queue.append((batch_id, batch))

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        batch_id, batch = self.queue.pop(0)
        try:
            return [("done", 0, batch_id, self.render(batch))]
        except Exception as e:  # a batch that crashed: its images fail, the others go on
            return [("failed", 0, batch_id, f"{type(e).__name__}: {e}")]

    def close(self) -> None:
        pass
