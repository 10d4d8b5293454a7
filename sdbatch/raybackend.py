"""`--backend ray`: render on Ray actors, one per GPU of the cluster (num_gpus=1 each), or the
given number of CPU actors. Needs the optional extra: `pip install "sdbatch[ray]"`.

The actors only render; the driver (the `sdbatch run` process) writes every file, the metadata and
the manifest, exactly as the local backend does. So the output folder only has to be reachable from
the driver, file names and metadata are identical, and the lock/resume/crash rules are the same.
The model path must exist on every node (same path: a shared file system or a copy).
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .devices import PREFETCH, ModelSpec, Results, build_renderer
from .errors import InputError


class RayExecutor:
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
        self.note = note
        if not ray.is_initialized():
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if spec.device.startswith("cuda") and gpus:
            count, resources = gpus, {"num_gpus": 1}
            self.device = "cuda"
        else:
            count, resources = max(1, cpu_workers), {"num_cpus": 1}
            self.device = "cpu"
            spec = ModelSpec(spec.path, spec.vae, "cpu", threads=1)
        actor = ray.remote(**resources)(_Actor)
        self.actors = [actor.remote(spec) for _ in range(count)]

    def map(self, batches: Iterable[list], stop: Callable[[], bool]) -> Iterator[tuple[list, Results]]:
        ray = self.ray
        pending = iter(batches)
        alive = list(range(len(self.actors)))
        inflight: dict[Any, tuple[int, list, int]] = {}  # ref -> (actor, batch, attempt)
        retry: list[tuple[list, int]] = []
        exhausted = False

        def submit() -> None:
            nonlocal exhausted
            for a in list(alive):
                while sum(1 for v in inflight.values() if v[0] == a) < PREFETCH:
                    if retry:
                        batch, attempt = retry.pop(0)
                    elif exhausted or stop():
                        return
                    else:
                        try:
                            batch, attempt = next(pending), 0
                        except StopIteration:
                            exhausted = True
                            return
                    inflight[self.actors[a].run.remote(batch)] = (a, batch, attempt)

        while True:
            submit()
            if not inflight:
                return
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                a, batch, attempt = inflight.pop(ref)
                try:
                    yield batch, ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    if a in alive:
                        alive.remove(a)
                        self.note(f"ray actor {a} died: {e}")
                    if attempt == 0 and alive:
                        retry.append((batch, 1))
                    else:
                        yield batch, [(None, f"ray actor died: {e}")] * len(batch)
                except ray.exceptions.RayTaskError as e:
                    yield batch, [(None, f"{type(e.cause).__name__}: {e.cause}")] * len(batch)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class _Actor:
    def __init__(self, spec: ModelSpec):
        self.render = build_renderer(spec)

    def run(self, batch: list) -> Results:
        return self.render(batch)
