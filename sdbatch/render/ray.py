"""`--backend ray`: render on Ray actors, one per GPU of the cluster (num_gpus=1 each), or the
given number of CPU actors. Needs the optional extra: `pip install "sdbatch[ray]"`.

The actors only render; the driver (the `sdbatch run` process) writes every file, the metadata and
the manifest, exactly as the local backend does. So the output folder only has to be reachable from
the driver, file names and metadata are identical, and the lock/resume/crash rules are the same.
The model path must exist on every node (same path: a shared file system or a copy).

Joining a cluster is bounded: Ray itself retries an unreachable address for many minutes, while we
hold the output folder's lock, so a malformed address is refused at once and an unreachable one
after SDBATCH_RAY_TIMEOUT seconds (30 by default), both as bad input (exit 2).
"""

import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..errors import InputError
from .devices import Results
from .worker import ModelSpec, build_renderer, load_error

LOAD_TIMEOUT = 900  # seconds to wait for a first actor to load the model
CONNECT_TIMEOUT = 30.0  # seconds to reach a Ray cluster; SDBATCH_RAY_TIMEOUT overrides
CLIENT_PORT = 10001  # Ray Client's port when a ray:// address names none
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_LONGER = "SDBATCH_RAY_TIMEOUT=<seconds> waits longer"
_FORMS = "write host:port (the head's GCS port, e.g. 10.0.0.5:6379), ray://host[:port] (Ray Client), auto or local"


def check_address(address: str | None) -> tuple[str, int] | None:
    """The host and port a Ray address points at (None for Ray's own words: none, `auto`, `local`).
    Torch- and Ray-free, so a front end can refuse a typo before doing anything else."""
    if address is None or address.strip() in ("", "auto", "local"):
        return None
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    elif scheme != "ray":
        raise InputError(f"--ray-address {address!r}: unknown scheme {scheme + '://'!r}; {_FORMS}")
    host, colon, port = rest.rpartition(":")
    if not colon or "]" in port:
        host, port = rest, str(CLIENT_PORT) if scheme else ""
    if not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--ray-address {address!r}: not a Ray address; {_FORMS}")
    return host.strip("[]"), int(port)


def resolve_address(address: str | None) -> str | None:
    """The address ray.init would use (the option, else $RAY_ADDRESS), checked."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    check_address(address)
    return address


def connect_timeout() -> float:
    text = os.environ.get("SDBATCH_RAY_TIMEOUT", "").strip()
    if not text:
        return CONNECT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(f"SDBATCH_RAY_TIMEOUT={text!r}: write a number of seconds greater than 0")
    return seconds


def connect(ray: Any, address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray (no address), within the timeout."""
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    where = check_address(address)
    if address is None or address == "local":  # starts Ray here: bounded by Ray's own start-up checks
        on_term = signal.getsignal(signal.SIGTERM)
        ray.init(address=address, **options)
        if on_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)  # ray.init's sys.exit(15) would cut a run short: SIGTERM is Ctrl-C
        return
    timeout = connect_timeout()
    deadline = time.monotonic() + timeout
    if where is not None:
        _probe(address, *where, timeout, deadline)
    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            ray.init(address=address, **options)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    # in a thread, so that a cluster which takes the connection but never answers cannot hold us
    thread = threading.Thread(target=init, name="sdbatch-ray-connect", daemon=True)
    quiet = _NoSignalWarning()
    logging.getLogger("ray._private.worker").addFilter(quiet)
    try:
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        logging.getLogger("ray._private.worker").removeFilter(quiet)
    if not outcome:
        why = "something listens there but did not let us join a Ray cluster" if where else "no Ray cluster joined"
        raise InputError(
            f"--ray-address {address}: {why} within {timeout:g} s "
            f"(another service, another Ray version, or token auth: RAY_AUTH_MODE); {_LONGER}"
        )
    if outcome[0] is not None:
        raise InputError(f"--ray-address {address}: could not join the Ray cluster: {_first_line(outcome[0])}")


class _NoSignalWarning(logging.Filter):
    """ray.init off the main thread warns that it set no SIGTERM handler: we want none (the runner
    handles SIGTERM: it finishes the batches in flight)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _probe(address: str, host: str, port: int, timeout: float, deadline: float) -> None:
    """Wait until something listens at host:port, retrying until the deadline (a head that is starting
    refuses for a moment); an unknown host is said at once."""
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())).close()
            return
        except socket.gaierror as e:
            raise InputError(f"--ray-address {address}: unknown host {host!r} ({e.strerror})") from None
        except OSError as e:
            why = e.strerror or "timed out"
        if (left := deadline - time.monotonic()) <= 0:
            raise InputError(
                f"--ray-address {address}: nothing answered within {timeout:g} s ({why}); is the Ray head running "
                f"(ray start --head)? {_LONGER}"
            )
        time.sleep(min(0.5, left))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class RayPool:
    def __init__(
        self,
        spec: ModelSpec,
        address: str | None = None,
        cpu_workers: int = 1,
        note: Callable[[str], None] = lambda m: None,
    ):
        address = resolve_address(address)  # before importing Ray: a typo is said at once
        try:
            import ray
        except ImportError:
            raise InputError('--backend ray needs Ray: pip install "sdbatch[ray]"') from None
        self.ray, self.note = ray, note
        if not ray.is_initialized():
            connect(ray, address)
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
        self.loading: dict[Any, int] = {a.ready.remote(): i for i, a in enumerate(self.actors)}
        try:
            self._wait_first_loaded()
        except BaseException:
            self.close()
            raise

    def _wait_first_loaded(self) -> None:
        """Rendering starts once one actor has the model (the others join as they load). If none can
        load it, the model is bad input, said in one line as the single-device path says it."""
        failed: dict[int, str] = {}
        deadline = time.monotonic() + LOAD_TIMEOUT
        while self.loading and (left := deadline - time.monotonic()) > 0:
            reports = self._load_reports(min(left, 1.0))
            failed.update((w, error) for w, error in reports if error is not None)
            if any(error is None for _, error in reports):
                break
        self.alive -= failed.keys()
        if not self.alive:
            raise InputError(failed[min(failed)])
        for w, reason in sorted(failed.items()):
            self.note(f"{self.names[w]} failed: {reason}")

    def _load_reports(self, timeout: float) -> list[tuple[int, str | None]]:
        """(actor, None) for each actor that now has the model, (actor, why) for each that cannot."""
        ray = self.ray
        ready, _ = ray.wait(list(self.loading), num_returns=1, timeout=timeout) if self.loading else ([], [])
        reports = []
        for ref in ready:
            w = self.loading.pop(ref)
            try:
                error = ray.get(ref)
            except ray.exceptions.RayError as e:
                error = f"{self.names[w]} did not start: {_first_line(e)}"
            if error is not None:
                ray.kill(self.actors[w])
            reports.append((w, error))
        return reports

    def submit(self, worker: int, batch_id: int, batch: list) -> None:
        self.inflight[self.actors[worker].run.remote(batch)] = (worker, batch_id)

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        ray = self.ray
        events: list[tuple[Any, ...]] = [("dead", w, error) for w, error in self._load_reports(0) if error]
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout) if self.inflight else ([], [])
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
    """Loads the model, or remembers why it could not (an exception here would kill the actor and
    reach the driver only as a many-line ActorDiedError)."""

    def __init__(self, spec: ModelSpec):
        try:
            self.render, self.error = build_renderer(spec), None
        except Exception as e:
            self.render, self.error = None, load_error(spec, e)

    def ready(self) -> str | None:
        return self.error

    def run(self, batch: list) -> Results:
        if self.render is None:  # batches sent before its failure was known: dead, so they go elsewhere
            import ray

            ray.actor.exit_actor()
        return self.render(batch)
