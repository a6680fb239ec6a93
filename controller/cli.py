"""The `goldilocks` command. Its parser and commands are in controller/cli_commands.py.

`goldilocks run --config FILE` puts flow snapshots back on emptied bridges before anything else
is imported, argparse and the YAML parser included (controller/warmstart.py): this module
imports nothing more than that first.
"""

from __future__ import annotations

import sys

from controller.warmstart import FIRST_WAIT_S, start_early

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (controller/warmstart.py)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TextIO


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    restores = start_early(args)
    if restores is not None:
        # Before importing anything more: the imports would hold the interpreter they run in.
        restores.wait(FIRST_WAIT_S)
    from controller.cli_commands import run_command

    return run_command(args, out, err, restores)


if __name__ == "__main__":
    sys.exit(main())
