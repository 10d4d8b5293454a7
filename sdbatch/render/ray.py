"""`--backend ray`: render on Ray actors, one per GPU of the cluster (num_gpus=1 each), or the
given number of CPU actors. Needs the optional extra: `pip install "sdbatch[ray]"`.

The actors only render; the driver (the `sdbatch run` process) writes every file, the metadata and
the manifest, exactly as the local backend does. So the output folder only has to be reachable from
the driver, file names and metadata are identical, and the lock/resume/crash rules are the same.
The model path must exist on every node (same path: a shared file system or a copy).
"""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..errors import InputError
from .devices import Results
from .worker import ModelSpec, build_renderer


class RayPool:
    def __init__(
        self,
        spec: ModelSpec,
        address: str | None = None,
        cpu_workers: int = 1,
        note: Callable[[str], None] = lambda m: None,
    ):
        try:
            import ray
        except ImportError:
            raise InputError('--backend ray needs Ray: pip install "sdbatch[ray]"') from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if spec.device.startswith("cuda") and gpus:
            count, resources, self.device = gpus, {"num_gpus": 1}, "cuda"
        else:
            count, resources, self.device = max(1, cpu_workers), {"num_cpus": 1}, "cpu"
            spec = replace(spec, device="cpu", threads=1)
        actor = ray.remote(**resources)(_Actor)
        self.actors = [actor.remote(spec) for _ in range(count)]
        self.names = [f"ray actor {i} ({self.device})" for i in range(count)]
        self.alive = set(range(count))
        self.inflight: dict[Any, tuple[int, int]] = {}  # ref -> (actor, batch id)

    def submit(self, worker: int, batch_id: int, batch: list) -> None:
        self.inflight[self.actors[worker].run.remote(batch)] = (worker, batch_id)

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        ray = self.ray
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout) if self.inflight else ([], [])
        events: list[tuple[Any, ...]] = []
        for ref in ready:
            if ref not in self.inflight:
                continue
            w, batch_id = self.inflight.pop(ref)
            try:
                events.append(("done", w, batch_id, ray.get(ref)))
            except ray.exceptions.RayActorError as e:
                self.inflight = {r: v for r, v in self.inflight.items() if v[0] != w}  # its other batches too
                events.append(("dead", w, str(e).splitlines()[0] if str(e) else type(e).__name__))
            except ray.exceptions.RayTaskError as e:
                events.append(("failed", w, batch_id, f"{type(e.cause).__name__}: {e.cause}"))
        return events

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class _Actor:
    def __init__(self, spec: ModelSpec):
        self.render = build_renderer(spec)

    def run(self, batch: list) -> Results:
        return self.render(batch)
