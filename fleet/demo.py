"""`goldilocks demo`: Goldilocks (SQLite) managing a simulated fleet of 2 hypervisors x 3 VMs,
playing the finance identity story, then showing how to reach the API and explain a verdict.

It ends by stopping everything it started (Mininet hosts and switches, Open vSwitch, the
controller, relays, agents, its temporary directory); with `stay`, only after Ctrl-C.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import TextIO

from fleet.control import Controller

STORY = Path(__file__).resolve().parent.parent / "mininet" / "scenarios" / "finance-identity.yaml"
DEMO_API_PORT = 8080
EXPLAIN = ("fin-desk1", "ledger-db", "tcp", 5432)


def _api_port() -> int | None:
    """8080 as the README says, unless something on this machine already listens there."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", DEMO_API_PORT))
        except OSError:
            return None
    return DEMO_API_PORT


def run_demo(out: TextIO, stay: bool = False) -> int:
    from fleet.runner import play, started
    from fleet.spec import load_simulation

    sim = load_simulation(STORY)
    run_dir = Path(tempfile.mkdtemp(prefix="glsim-", dir="/tmp"))
    controller = Controller.local(run_dir, _api_port())
    print("Starting Goldilocks (SQLite) and a Mininet fleet of 2 hypervisors x 3 VMs ...", file=out, flush=True)
    try:
        with started(sim, out, controller, run_dir) as run:
            tally = play(run)
            show_api(run.controller, out)
            if stay:
                wait_for_interrupt(out)
            else:
                print("(To try these yourself, keep it running: DEMO_STAY=1 make demo, or goldilocks demo --stay.)",
                      file=out)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print("Stopped: fleet, Open vSwitch, controller, relays and agents are gone.", file=out)
    return 0 if tally.failed == 0 else 1


def show_api(controller: Controller, out: TextIO) -> None:
    from controller.cli_commands import _print_explanation

    src, dst, proto, port = EXPLAIN
    env = f"GOLDILOCKS_API={controller.api_url} GOLDILOCKS_TOKEN={controller.token}"
    print(f"""
The controller's REST API: {controller.api_url}/api/v1   (OpenAPI: {controller.api_url}/docs)
Admin token: {controller.token}

  export {env.replace(' ', chr(10) + '  export ')}
  .venv/bin/goldilocks status
  .venv/bin/goldilocks explain --src {src} --dst {dst} --proto {proto} --port {port}
  curl -H "Authorization: Bearer $GOLDILOCKS_TOKEN" "$GOLDILOCKS_API/api/v1/quarantine"

which now answers:
""", file=out)
    data = controller.call("POST", "/explain", {"src": src, "dst": dst, "protocol": proto, "port": port})
    _print_explanation(data, False, out)
    print(file=out, flush=True)


def wait_for_interrupt(out: TextIO) -> None:
    print("Goldilocks and the fleet stay up: press Ctrl-C to stop them.", file=out, flush=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("\nStopping ...", file=out, flush=True)

