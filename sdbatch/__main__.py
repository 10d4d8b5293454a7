"""`python -m sdbatch` and the `sdbatch` console script.

SIGTERM is made Ctrl-C before anything else is imported, so that systemd, SLURM or `kill` at any
moment (even while the CLI is still starting) gets what Ctrl-C gets: exit 130, nothing half-written.
"""

import signal
import sys


def main() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from sdbatch.cli import app

        app(prog_name="sdbatch")  # typer turns a KeyboardInterrupt in a command into exit 130
    except KeyboardInterrupt:  # while importing
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
