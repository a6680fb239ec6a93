"""The first thing `goldilocks run` does: put stored flow snapshots (controller/flowsnap.py)
back onto emptied bridges while the rest of the controller is still importing and loading.

It dials each local bridge's OpenFlow management socket (`<bridge>.mgmt`, beside the OVSDB
socket of a hypervisor configured as `unix:PATH`) as ovn-controller and ovs-ofctl do, rather
than waiting for the bridge to call: a switch whose controller has been away reconnects only
when its backoff (up to max_backoff, 8 s by default) lets it, long after this start is over.
A bridge gets its snapshot only if `flowsnap.refusal` finds nothing against it (it must be
empty, among other things); either way the connection is closed at once, and the full
controller reconciles every bridge as on any start. Remote hypervisors (OVSDB over TCP or SSL)
are left to the full controller. Standard library and the two modules above only: importing
more would defeat the purpose.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from apps.restore import Choice, Outcome, SwitchView, restore_connection
from controller.flowsnap import StoredSnapshots, load_snapshots, refusal, sqlite_path

if TYPE_CHECKING:
    from controller.config import Config

LOG = logging.getLogger("goldilocks.restore")
TIMEOUT_S = 5.0  # per bridge; a stuck switch must not hold the controller's start for long


class Restores:
    """Restores running in the background, one thread per local bridge."""

    def __init__(self, jobs: dict[str, Callable[[], Outcome]]) -> None:
        self._outcomes: dict[str, Outcome] = {}
        self._threads = [threading.Thread(target=self._run, args=(hv, job), name=f"restore-{hv}", daemon=True)
                         for hv, job in sorted(jobs.items())]

    def start(self) -> Restores:
        for t in self._threads:
            t.start()
        return self

    def wait(self, timeout: float = TIMEOUT_S + 1.0) -> dict[str, Outcome]:
        """Every outcome, once each restore has ended (or `timeout` has passed)."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return dict(self._outcomes)

    def _run(self, hypervisor: str, job: Callable[[], Outcome]) -> None:
        outcome = job()
        self._outcomes[hypervisor] = outcome
        if outcome.installed:
            LOG.info("%s: restored %d flow mods from its snapshot", hypervisor, outcome.installed)
        else:
            LOG.info("%s: flow snapshot not restored: %s", hypervisor, outcome.reason)


def start_restores(config: Config) -> Restores | None:
    """Restores of every local bridge, started; None when there is nothing to restore."""
    if not config.restore:
        return None
    path = sqlite_path(config.database_url)
    if path is None:
        LOG.debug("no flow restore: snapshots are read from a SQLite database only")
        return None
    stored = load_snapshots(path)
    if not stored.by_dpid:
        return None
    choose = functools.partial(choose_snapshot, stored, config.digest)
    jobs = {hv.name: functools.partial(restore_bridge, mgmt, choose)
            for hv in config.hypervisors.values() if (mgmt := management_socket(hv.ovsdb, hv.bridge)) is not None}
    return Restores(jobs).start() if jobs else None


def management_socket(ovsdb: str, bridge: str) -> Path | None:
    """Where a bridge of a local Open vSwitch listens for OpenFlow management connections: in
    its run directory, beside the OVSDB socket."""
    if not ovsdb.startswith("unix:"):
        return None
    return Path(ovsdb[len("unix:"):]).parent / f"{bridge}.mgmt"


def restore_bridge(mgmt: Path, choose: Callable[[SwitchView], Choice]) -> Outcome:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    try:
        sock.connect(str(mgmt))
    except OSError as exc:
        sock.close()
        return Outcome(None, 0, f"cannot reach {mgmt}: {exc.strerror or exc}")
    return restore_connection(sock, choose, TIMEOUT_S)


def choose_snapshot(stored: StoredSnapshots, digest: str, view: SwitchView) -> Choice:
    snapshot = stored.by_dpid.get(view.dpid)
    reason = refusal(snapshot, version=view.version, ports=view.ports, flow_count=view.flow_count,
                     generation=stored.generation, digest=digest, now=time.time())
    if reason is not None:
        return reason
    assert snapshot is not None  # refusal names a missing one
    return snapshot.flow_mods
