"""`python -m sdbatch` and the `sdbatch` console script.

SIGTERM is made Ctrl-C before anything else is imported, so that systemd, SLURM or `kill` at any
moment (even while the CLI is still starting) gets what Ctrl-C gets: exit 130, nothing half-written.
"""

import atexit
import contextlib
import os
import signal
import sys

from sdbatch.errors import EXIT_INTERRUPTED, on_interrupt  # a few lines: the handler is in before anything big


def main() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_interrupt)
    try:
        try:
            from sdbatch.cli import app

            app(prog_name="sdbatch")  # typer turns a KeyboardInterrupt in a command into exit 130
        except KeyboardInterrupt:  # while importing
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
    except SystemExit as e:
        if e.code != EXIT_INTERRUPTED:
            raise
        exit_interrupted()
    except KeyboardInterrupt:  # one more while the first was being handled
        exit_interrupted()


def exit_interrupted() -> None:
    """Exit 130 now, and not through sys.exit: a Ctrl-C (or our SIGTERM) that lands while C code
    runs Python through PyRun_String (importing torch, say) sets CPython's "unhandled
    KeyboardInterrupt" flag for good, and Py_RunMain then ends the process by SIGINT (status -2)
    whatever sys.exit said, although the interrupt was handled. Later signals are ignored, the
    atexit handlers run (the worker pool's among them), the streams are flushed, then _exit."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
                stream.flush()
        os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
