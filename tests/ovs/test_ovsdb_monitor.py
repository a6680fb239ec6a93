"""OvsdbMonitor against a real, private ovsdb-server + ovs-vswitchd (tests/ovs/harness.py)."""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.ovs.conftest import BridgeFactory
from tests.ovs.harness import OvsSandbox, find_tool
from tests.support import make_pki
from topology.inventory import ObservedBridge, ObservedPort
from topology.ovsdb import OvsdbMonitor

WAIT = 10.0  # seconds: a bound on waiting, never asserted as a timing
VM_A = "6f1c1a32-9c1e-4d54-8f7e-6f0b2b8f0a01"
VM_B = "0b6a7d55-3d39-4f7a-9d4e-2b4a1c9e0a02"


class Snapshots:
    """Collects what on_change delivers (from the monitor's thread) for bounded waits."""

    def __init__(self) -> None:
        self.queue: queue.Queue[ObservedBridge] = queue.Queue()
        self.seen: list[ObservedBridge] = []

    def __call__(self, snapshot: ObservedBridge) -> None:
        self.queue.put(snapshot)

    def wait_for(self, predicate: Callable[[ObservedBridge], bool],
                 timeout: float = WAIT) -> ObservedBridge:
        """The first snapshot (already seen or arriving) satisfying ``predicate``."""
        for snapshot in self.seen:
            if predicate(snapshot):
                return snapshot
        while True:
            try:
                snapshot = self.queue.get(timeout=timeout)
            except queue.Empty:
                last = self.seen[-1] if self.seen else None
                pytest.fail(f"no matching snapshot within {timeout}s; last one: {last}")
            self.seen.append(snapshot)
            if predicate(snapshot):
                return snapshot


MonitorFactory = Callable[..., tuple[OvsdbMonitor, Snapshots]]


@pytest.fixture
def start_monitor(ovs: OvsSandbox) -> Iterator[MonitorFactory]:
    """Start monitors on the sandbox's unix socket (or ``remote=``); stop them afterwards."""
    monitors: list[OvsdbMonitor] = []

    def start(bridge: str, remote: str | None = None, **kwargs: object) -> tuple[
            OvsdbMonitor, Snapshots]:
        snapshots = Snapshots()
        monitor = OvsdbMonitor("hv1", remote or f"unix:{ovs.db_sock}", bridge, snapshots,
                               **kwargs)  # type: ignore[arg-type]
        monitors.append(monitor)
        monitor.start()
        return monitor, snapshots

    try:
        yield start
    finally:
        for monitor in monitors:
            monitor.stop()


def vm_ids(vm: str, iface: str, mac: str) -> dict[str, str]:
    """What libvirt writes on a vNIC's Interface row."""
    return {"iface-id": iface, "attached-mac": mac, "vm-id": vm}


def port(snapshot: ObservedBridge, name: str) -> ObservedPort | None:
    return next((p for p in snapshot.ports if p.name == name), None)


def by_ofport(snapshot: ObservedBridge, ofport: int) -> ObservedPort | None:
    return next((p for p in snapshot.ports if p.ofport == ofport), None)


def test_initial_snapshot_has_dpid_and_bound_vm_ports(
        ovs: OvsSandbox, bridge_factory: BridgeFactory, start_monitor: MonitorFactory) -> None:
    br = bridge_factory(dpid=0xA1B2)
    ovs.add_vm_port(br, "mvm1", mac="02:00:00:00:01:01", ip="10.0.0.1/24", ofport=11,
                    external_ids=vm_ids(VM_A.upper(), "iface-a", "02:00:00:00:01:01"))
    monitor, snaps = start_monitor(br)
    snap = snaps.wait_for(lambda s: s.dpid == 0xA1B2 and by_ofport(s, 11) is not None)
    assert snap.fail_mode == "secure" and snap.datapath_type == "netdev"
    assert snap.ports == (ObservedPort("mvm1", 11, "02:00:00:00:01:01", "iface-a", VM_A,
                                       uplink=False),)
    assert monitor.connected


def test_adding_and_removing_a_port_each_give_a_snapshot(
        ovs: OvsSandbox, bridge_factory: BridgeFactory, start_monitor: MonitorFactory) -> None:
    br = bridge_factory()
    _, snaps = start_monitor(br)
    snaps.wait_for(lambda s: s.ports == ())
    ovs.add_vm_port(br, "mvm2", mac="02:00:00:00:02:01", ip="10.0.0.2/24", ofport=12,
                    external_ids=vm_ids(VM_B, "iface-b", "02:00:00:00:02:01"))
    # OVS writes the row first and the ofport a moment later: wait for the complete port.
    added = snaps.wait_for(lambda s: (p := port(s, "mvm2")) is not None and p.ofport == 12)
    assert port(added, "mvm2") == ObservedPort("mvm2", 12, "02:00:00:00:02:01", "iface-b",
                                               VM_B, uplink=False)
    ovs.del_vm_port("mvm2")
    snaps.wait_for(lambda s: port(s, "mvm2") is None and s is not added)


def test_a_reused_ofport_shows_the_new_vm(
        ovs: OvsSandbox, bridge_factory: BridgeFactory, start_monitor: MonitorFactory) -> None:
    br = bridge_factory()
    ovs.add_vm_port(br, "mvm3", mac="02:00:00:00:03:01", ip="10.0.0.3/24", ofport=13,
                    external_ids=vm_ids(VM_A, "iface-a", "02:00:00:00:03:01"))
    _, snaps = start_monitor(br)
    snaps.wait_for(lambda s: (p := by_ofport(s, 13)) is not None and p.vm_uuid == VM_A)
    ovs.del_vm_port("mvm3")
    ovs.add_vm_port(br, "mvm4", mac="02:00:00:00:04:01", ip="10.0.0.4/24", ofport=13,
                    external_ids={"iface-id": "iface-b", "attached-mac": "02:00:00:00:04:01",
                                  "vm-uuid": VM_B})  # the Nova spelling, this time
    snap = snaps.wait_for(lambda s: (p := by_ofport(s, 13)) is not None and p.vm_uuid == VM_B)
    assert port(snap, "mvm3") is None
    assert port(snap, "mvm4") == ObservedPort("mvm4", 13, "02:00:00:00:04:01", "iface-b",
                                              VM_B, uplink=False)


def test_a_standalone_bridge_is_reported_and_left_alone_by_default(
        ovs: OvsSandbox, bridge_factory: BridgeFactory, start_monitor: MonitorFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    br = bridge_factory(fail_mode="standalone")
    with caplog.at_level(logging.WARNING):
        _, snaps = start_monitor(br)
        snaps.wait_for(lambda s: s.fail_mode == "standalone")
        ovs.add_vm_port(br, "mvm5", mac="02:00:00:00:05:01", ip="10.0.0.5/24", ofport=15,
                        external_ids=vm_ids(VM_A, "iface-a", "02:00:00:00:05:01"))
        snaps.wait_for(lambda s: by_ofport(s, 15) is not None)
    warnings = [r.getMessage() for r in caplog.records if "learning switch" in r.getMessage()]
    # Logged once when it appeared, not again for the port change nor on every poll.
    assert len(warnings) == 1, warnings
    assert "not secure" in warnings[0]
    assert ovs.vsctl("get", "Bridge", br, "fail_mode").strip() == "standalone"


def test_set_fail_secure_makes_the_bridge_secure(
        ovs: OvsSandbox, bridge_factory: BridgeFactory, start_monitor: MonitorFactory) -> None:
    br = bridge_factory(fail_mode="standalone")
    _, snaps = start_monitor(br, set_fail_secure=True)
    snaps.wait_for(lambda s: s.fail_mode == "secure")
    assert ovs.vsctl("get", "Bridge", br, "fail_mode").strip() == "secure"


def test_a_tcp_remote_works(ovs: OvsSandbox, bridge_factory: BridgeFactory,
                            start_monitor: MonitorFactory) -> None:
    br = bridge_factory(dpid=0xC0FFEE)
    with tcp_remote(ovs) as remote:
        monitor, snaps = start_monitor(br, remote=remote)
        snaps.wait_for(lambda s: s.dpid == 0xC0FFEE)
        assert monitor.connected


def test_the_monitor_reconnects_and_catches_up(
        ovs: OvsSandbox, bridge_factory: BridgeFactory, start_monitor: MonitorFactory) -> None:
    br = bridge_factory()
    remote = tcp_remote(ovs)
    with remote as address:
        monitor, snaps = start_monitor(br, remote=address)
        snaps.wait_for(lambda s: s.ports == ())
    # The listener is gone, and ovsdb-server drops its sessions with it.
    assert wait_until(lambda: not monitor.connected)
    ovs.add_vm_port(br, "mvm6", mac="02:00:00:00:06:01", ip="10.0.0.6/24", ofport=16,
                    external_ids=vm_ids(VM_A, "iface-a", "02:00:00:00:06:01"))
    with remote:
        # Reconnect backoff reaches 8 s, hence the longer bound.
        snaps.wait_for(lambda s: by_ofport(s, 16) is not None, timeout=30.0)
        assert monitor.connected


def test_a_missing_bridge_gives_no_snapshot_until_it_appears(
        bridge_factory: BridgeFactory, start_monitor: MonitorFactory) -> None:
    _, snaps = start_monitor("brlate")
    br = bridge_factory("brlate", dpid=0x77)
    assert snaps.wait_for(lambda s: s.dpid == 0x77).bridge == br


def test_stop_ends_the_thread(bridge_factory: BridgeFactory,
                              start_monitor: MonitorFactory) -> None:
    br = bridge_factory()
    monitor, snaps = start_monitor(br)
    snaps.wait_for(lambda s: True)
    monitor.stop(timeout=5.0)
    assert not monitor.connected


# --------------------------------------------------------------------------- helpers


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``condition`` until true or ``timeout``; no waiting event exists for these."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class tcp_remote:
    """Make the sandbox's ovsdb-server also listen on 127.0.0.1:<free port>, for one test."""

    def __init__(self, ovs: OvsSandbox) -> None:
        self.ovs = ovs
        with socket.socket() as probe:  # let the kernel choose a free port
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.listener = f"ptcp:{self.port}:127.0.0.1"

    def __enter__(self) -> str:
        self._appctl("ovsdb-server/add-remote", self.listener)
        return f"tcp:127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self._appctl("ovsdb-server/remove-remote", self.listener)

    def _appctl(self, *args: str) -> None:
        subprocess.run([find_tool("ovs-appctl") or "ovs-appctl", "-t", str(self.ovs.ovsdb_ctl),
                        *args], env=self.ovs.env, check=True, capture_output=True, timeout=10)


class ssl_ovsdb:
    """A second, standalone ovsdb-server with the vswitch schema, serving only ssl: with a CA
    that must have signed the client's certificate (as a hypervisor's OVSDB would)."""

    def __init__(self, tmp: Path, pki: dict[str, Path]) -> None:
        self.dir, self.pki = tmp / "ssl-ovsdb", pki
        self.dir.mkdir()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.sock = self.dir / "db.sock"

    def __enter__(self) -> str:
        db = self.dir / "conf.db"
        subprocess.run([find_tool("ovsdb-tool") or "ovsdb-tool", "create", str(db),
                        "/usr/share/openvswitch/vswitch.ovsschema"], check=True, capture_output=True)
        self.proc = subprocess.Popen([
            find_tool("ovsdb-server") or "ovsdb-server", str(db), f"--remote=punix:{self.sock}",
            f"--remote=pssl:{self.port}:127.0.0.1", f"--private-key={self.pki['switch.key']}",
            f"--certificate={self.pki['switch.crt']}", f"--ca-cert={self.pki['ca.crt']}",
            f"--unixctl={self.dir / 'ovsdb.ctl'}", f"--log-file={self.dir / 'ovsdb.log'}",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self.sock.exists, 10), "ssl ovsdb-server did not start"
        vsctl = [find_tool("ovs-vsctl") or "ovs-vsctl", f"--db=unix:{self.sock}", "--no-wait"]
        subprocess.run([*vsctl, "init"], check=True, capture_output=True)
        subprocess.run([*vsctl, "add-br", "brs", "--", "set", "Bridge", "brs", "fail_mode=secure",
                        "--", "add-port", "brs", "vnet0", "--", "set", "Interface", "vnet0",
                        f"external_ids:vm-id={VM_A}", "external_ids:attached-mac=52:54:00:00:00:0a"],
                       check=True, capture_output=True)
        return f"ssl:127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_an_ssl_remote_works_and_needs_a_certificate_the_server_trusts(
        tmp_path: Path, start_monitor: MonitorFactory) -> None:
    pki = make_pki(tmp_path)
    with ssl_ovsdb(tmp_path, pki) as remote:
        _, snapshots = start_monitor("brs", remote=remote, ssl=(
            str(pki["controller.key"]), str(pki["controller.crt"]), str(pki["ca.crt"])))
        seen = snapshots.wait_for(lambda s: port(s, "vnet0") is not None)
        assert seen.fail_mode == "secure" and port(seen, "vnet0").vm_uuid == VM_A
        # python-ovs keeps one SSL identity per process, so each other client runs on its own.
        for who, expect in (("controller", "snapshot"), ("rogue", "no snapshot")):
            proc = subprocess.run([sys.executable, "-c", SSL_CLIENT, remote, str(pki[f"{who}.key"]),
                                   str(pki[f"{who}.crt"]), str(pki["ca.crt"])],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert proc.stdout.strip() == expect, f"{who}: {proc.stdout}{proc.stderr}"


ROOT = Path(__file__).resolve().parents[2]


SSL_CLIENT = """
import sys, threading
from topology.ovsdb import OvsdbMonitor
got = threading.Event()
m = OvsdbMonitor("hv1", sys.argv[1], "brs", lambda s: got.set(), ssl=(sys.argv[2], sys.argv[3], sys.argv[4]))
m.start()
print("snapshot" if got.wait(5) else "no snapshot")
m.stop()
"""


def test_columns_read_fast_equal_python_ovs_reads_and_pending_changes_still_show(
        ovs: OvsSandbox, bridge_factory: BridgeFactory) -> None:
    from topology.ovsdb import COLUMNS, _column
    from topology.ovslib import ovs as pyovs

    br = bridge_factory(fail_mode="standalone")
    ovs.add_vm_port(br, "mvm9", mac="02:00:00:00:09:01", ip="10.0.0.9/24", ofport=19,
                    external_ids=vm_ids(VM_A, "iface-a", "02:00:00:00:09:01"))
    helper = OvsdbMonitor("hv1", f"unix:{ovs.db_sock}", br, lambda _: None)._schema_helper()
    idl = pyovs.db.idl.Idl(f"unix:{ovs.db_sock}", helper)
    try:
        deadline = time.monotonic() + WAIT
        while not (idl.has_ever_connected() and any(r.name == "mvm9" for r in idl.tables["Interface"].rows.values())):
            assert time.monotonic() < deadline, "the IDL did not sync"
            idl.run()
            poller = pyovs.poller.Poller()
            idl.wait(poller)
            poller.timer_wait(100)
            poller.block()
        for table, columns in COLUMNS.items():
            for row in idl.tables[table].rows.values():
                for column in columns:
                    assert _column(row, column) == getattr(row, column), (table, column)
        bridge = next(r for r in idl.tables["Bridge"].rows.values() if r.name == br)
        txn = pyovs.db.idl.Transaction(idl)
        bridge.fail_mode = ["secure"]  # pending, not committed: python-ovs shows it, so must we
        assert _column(bridge, "fail_mode") == bridge.fail_mode == ["secure"]
        txn.abort()
    finally:
        idl.close()
