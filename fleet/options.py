"""The command-line options of a simulation run, shared by `goldilocks sim` and mininet/run.py.

Apart from fleet.runner so that building the `goldilocks` parser — which every command does,
`goldilocks run` first of all — does not import the simulation machinery."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def add_controller_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controller", metavar="HOST:PORT",
                   help="use a running controller's OpenFlow listener instead of starting one")
    p.add_argument("--api", metavar="URL", help="with --controller: its REST API (default http://HOST:8080)")
    p.add_argument("--token", help="with --controller: an admin token (default $GOLDILOCKS_TOKEN)")
    p.add_argument("--run-dir", metavar="DIR", type=Path,
                   help="keep the run's files (OVS database and sockets, logs, configs) here instead of a "
                        "temporary directory removed at the end")
    p.add_argument("--prefix", type=_prefix, help="name prefix of the fleet's switches and interfaces, "
                                                  "1-8 lower-case letters and digits (default: random)")


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-8 lower-case letters and digits, starting with a letter")
    return text
