"""The errors every front end maps to exit codes, and the codes themselves (defined once, here).

Kept free of heavy imports: the CLI catches these without importing torch or transformers first."""

EXIT_OK = 0  # every image of the job (or shard) is done
EXIT_FAILED = 1  # some images failed (their reasons are printed and in the manifest); the rest are written
EXIT_BAD_INPUT = 2  # bad input: job file, weights, images, arguments; nothing was rendered
EXIT_LOCKED = 75  # the output folder is being written by another run (EX_TEMPFAIL: try again later)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; the images in flight were finished and written first


class InputError(Exception):
    """Bad input from the user (a file, a folder, an option); the message says what and where."""

    exit_code = EXIT_BAD_INPUT


class OutputLocked(Exception):
    """Another run holds the output folder, so that cron can tell "busy" from "broken"."""

    exit_code = EXIT_LOCKED


class Interrupts:
    """Ctrl-C and SIGTERM this process has received through `on_interrupt` (the `sdbatch` entry
    point's handler). A KeyboardInterrupt raised while Python runs a `__del__` is printed and
    dropped by Python itself, so a signal landing there (a library's cleanup during an import)
    would be lost; the count keeps it, and a run starting after it stops at once (runner)."""

    seen = 0
    deferred = 0  # of those, the ones that landed during an import and raised nothing (on_interrupt)


def on_interrupt(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM -> KeyboardInterrupt, counted in `Interrupts.seen`; while a module is being
    imported, the first is only counted (`Interrupts.deferred`): the run stops when it starts
    (runner), and any other command exits 130 when its work is done (cli._guard)."""
    Interrupts.seen += 1
    if _importing() and not Interrupts.deferred:  # a second one raises: a hung import can still be left
        Interrupts.deferred += 1
        return
    raise KeyboardInterrupt


def _importing() -> bool:
    """Whether some module's import is under way. torch's import runs Python from C++ (pybind11:
    torch._C's init imports torch.distributed...), and a KeyboardInterrupt raised there cannot be
    unwound: C++ calls std::terminate and the process dies by SIGABRT (exit 134), not 130."""
    import sys

    return any(getattr(getattr(m, "__spec__", None), "_initializing", False) for m in list(sys.modules.values()))
