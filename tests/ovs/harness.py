"""A private Open vSwitch for tests: its own ovsdb-server, ovs-vswitchd and network namespaces.

Nothing here touches a system OVS service. Every daemon, socket, log and database lives in
one temporary directory, and ovs-vswitchd runs inside a private network namespace, so the
kernel tap devices a netdev datapath creates (one per bridge, plus ``ovs-netdev``) cannot
clash with another sandbox, with Mininet, or with the host.

Layout::

    root netns          sandbox netns <prefix>            VM netns <prefix>-<name>
    ovsdb-server        ovs-vswitchd, bridges,            eth0 (MAC, IP, tx off)
    (unix sockets)      bridge-side veth ends  <--veth-->

Every ovs-vsctl / ovs-ofctl / ovs-appctl call names the sandbox explicitly (``--db=unix:``,
``unix:<dir>/<bridge>.mgmt``, ``-t <dir>/ovs-vswitchd.ctl``) and also runs with OVS_RUNDIR,
OVS_DBDIR, OVS_LOGDIR and OVS_SYSCONFDIR pointing at the sandbox directory.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OF_VERSION = "OpenFlow14"
LOCAL_OFPORT = 65534
MAX_IFNAME = 15
VM_IFACE = "eth0"
REQUIRED_TOOLS = (
    "ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ovs-appctl",
    "ip", "ethtool", "ping",
)


class OvsError(RuntimeError):
    """An OVS or ip command failed; the message carries the command and its stderr."""


def find_tool(name: str) -> str | None:
    """Path of an executable, also looking in the sbin directories a non-login PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_tools() -> list[str]:
    """Names of the tools the harness needs that are not installed."""
    return [name for name in REQUIRED_TOOLS if find_tool(name) is None]


def unavailable_reason() -> str | None:
    """Why real-OVS tests cannot run here (not root, tools missing), or None if they can."""
    if os.geteuid() != 0:
        return "real-OVS tests need root (network namespaces, veth pairs, ovs-vswitchd)"
    missing = missing_tools()
    if missing:
        return f"real-OVS tests need these tools, not installed: {', '.join(missing)}"
    if not SCHEMA.is_file():
        return f"real-OVS tests need the OVS schema {SCHEMA} (package openvswitch-common)"
    return None


def _run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 30.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    tool = find_tool(cmd[0]) or cmd[0]
    proc = subprocess.run(
        [tool, *cmd[1:]], env=env, input=input, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    if check and proc.returncode != 0:
        raise OvsError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"stderr: {proc.stderr.strip()}\nstdout: {proc.stdout.strip()}"
        )
    return proc


def _check_ifname(name: str) -> None:
    if not name or len(name) > MAX_IFNAME or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"bad interface name {name!r}: 1-{MAX_IFNAME} chars of [A-Za-z0-9_.-]")


# --------------------------------------------------------------------------- trace parsing


@dataclass(frozen=True)
class OdpPort:
    """One port of the datapath, as listed by ``ovs-appctl dpif/show``."""

    bridge: str
    name: str
    ofport: int | None
    odp_port: int


@dataclass(frozen=True)
class TraceResult:
    """What ``ofproto/trace`` says happens to one packet, recirculations included.

    ``stages`` holds the "Datapath actions:" line of every stage in order (the first pass
    and each conntrack recirculation that the trace followed). ``output_ports`` are the
    ports the packet leaves by, over all stages: the OpenFlow port number when the port
    belongs to the traced bridge, otherwise the port name ("LOCAL" for the bridge port,
    "CONTROLLER" for a packet-in). ``dropped`` is true when no stage outputs the packet.
    """

    text: str
    stages: tuple[str, ...]
    output_ports: tuple[int | str, ...]

    @property
    def dropped(self) -> bool:
        return not self.output_ports

    @property
    def final_actions(self) -> str:
        return self.stages[-1] if self.stages else ""


_DP_ACTIONS = re.compile(r"^Datapath actions:\s*(.*)$", re.MULTILINE)
_DPIF_BRIDGE = re.compile(r"^  (\S+):$")
_DPIF_PORT = re.compile(r"^    (\S+) (\d+|none)/(\d+|none):")


def split_actions(text: str) -> list[str]:
    """Split a datapath action list at top-level commas: ``ct(commit,zone=1),3`` -> 2 items."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current.append(char)
    tail = "".join(current).strip()
    if tail:
        items.append(tail)
    return [item for item in items if item]


def _action_outputs(action: str) -> list[int | str]:
    """Output ports (odp numbers, or "CONTROLLER") of one datapath action."""
    if action.isdigit():
        return [int(action)]
    if action.startswith("userspace(") and "controller" in action:
        return ["CONTROLLER"]
    if action.startswith("clone(") and action.endswith(")"):
        return datapath_outputs(action[len("clone("):-1])
    return []


def datapath_outputs(actions: str) -> list[int | str]:
    """Output ports named by one "Datapath actions:" line (ct, recirc, set, ... ignored)."""
    outputs: list[int | str] = []
    for action in split_actions(actions):
        outputs.extend(_action_outputs(action))
    return outputs


def parse_dpif_show(text: str) -> dict[int, OdpPort]:
    """Map datapath port number -> port, from ``ovs-appctl dpif/show``."""
    ports: dict[int, OdpPort] = {}
    bridge = ""
    for line in text.splitlines():
        if match := _DPIF_BRIDGE.match(line):
            bridge = match.group(1)
        elif (match := _DPIF_PORT.match(line)) and match.group(3) != "none":
            name, ofport, odp = match.groups()
            ports[int(odp)] = OdpPort(bridge, name, None if ofport == "none" else int(ofport),
                                      int(odp))
    return ports


def _port_label(odp: int | str, bridge: str, ports: dict[int, OdpPort]) -> int | str:
    if isinstance(odp, str):
        return odp
    port = ports.get(odp)
    if port is None:
        return f"odp:{odp}"
    if port.bridge == bridge and port.ofport is not None:
        return "LOCAL" if port.ofport == LOCAL_OFPORT else port.ofport
    return port.name


def parse_trace(text: str, bridge: str, ports: dict[int, OdpPort]) -> TraceResult:
    """Turn ``ofproto/trace`` output into a TraceResult (see its docstring)."""
    stages = tuple(match.group(1).strip() for match in _DP_ACTIONS.finditer(text))
    outputs: list[int | str] = []
    for stage in stages:
        for odp in datapath_outputs(stage):
            label = _port_label(odp, bridge, ports)
            if label not in outputs:
                outputs.append(label)
    return TraceResult(text=text, stages=stages, output_ports=tuple(outputs))


# --------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class VmPort:
    """A simulated VM: a network namespace whose eth0 is veth-linked to a bridge port."""

    name: str
    netns: str
    bridge: str
    port_name: str
    ofport: int
    mac: str
    ip: str  # with prefix, e.g. 10.0.0.1/24
    external_ids: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def ip_address(self) -> str:
        return self.ip.split("/", 1)[0]

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside this VM's namespace."""
        return [find_tool("ip") or "ip", "netns", "exec", self.netns, *cmd]

    def exec(
        self, cmd: Sequence[str], timeout: float = 10.0, *, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace; never raises on a non-zero exit."""
        return subprocess.run(self.command(cmd), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the namespace (binary pipes unless told otherwise)."""
        return subprocess.Popen(self.command(cmd), **kwargs)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Link:
    """A link between two bridges: a veth pair, or two patch ports."""

    kind: str
    bridge_a: str
    port_a: str
    ofport_a: int
    bridge_b: str
    port_b: str
    ofport_b: int


@dataclass(frozen=True)
class Checkpoint:
    """What a sandbox held at one moment, so later additions can be removed."""

    bridges: frozenset[str]
    vms: frozenset[str]
    links: frozenset[Link]


# --------------------------------------------------------------------------- the sandbox


class OvsSandbox:
    """A private ovsdb-server + ovs-vswitchd in a temporary directory and network namespace."""

    def __init__(self, base_dir: str | Path = "/tmp") -> None:
        # /tmp by default: unix socket paths must stay under 108 bytes.
        self.prefix = "gl" + secrets.token_hex(3)
        self.dir = Path(tempfile.mkdtemp(prefix=f"goldilocks-ovs-{self.prefix}-",
                                         dir=str(base_dir)))
        self.netns = self.prefix
        self.db_sock = self.dir / "db.sock"
        self.vswitchd_ctl = self.dir / "ovs-vswitchd.ctl"
        self.ovsdb_ctl = self.dir / "ovsdb-server.ctl"
        self.env = {
            **os.environ,
            "OVS_RUNDIR": str(self.dir), "OVS_DBDIR": str(self.dir),
            "OVS_LOGDIR": str(self.dir), "OVS_SYSCONFDIR": str(self.dir),
            "OVS_PKGDATADIR": str(SCHEMA.parent),
        }
        self.bridges: list[str] = []
        self.vms: dict[str, VmPort] = {}
        self.links: list[Link] = []
        self._netns_made: list[str] = []
        self._link_seq = 0
        self._started = False
        self.start_seconds = 0.0

    # ---- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> OvsSandbox:
        """Create the database, start both daemons; on any failure clean up and raise."""
        began = time.monotonic()
        atexit.register(self.stop)
        self._started = True
        try:
            self._start_netns()
            self._start_ovsdb()
            self._start_vswitchd()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _start_netns(self) -> None:
        self._add_netns(self.netns)
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])

    def _start_ovsdb(self) -> None:
        db = self.dir / "conf.db"
        _run(["ovsdb-tool", "create", str(db), str(SCHEMA)], env=self.env)
        _run(["ovsdb-server", str(db), f"--remote=punix:{self.db_sock}",
              f"--pidfile={self.dir / 'ovsdb-server.pid'}", f"--unixctl={self.ovsdb_ctl}",
              f"--log-file={self.dir / 'ovsdb-server.log'}", "--detach", "--no-chdir",
              "-vconsole:off"], env=self.env)
        self.vsctl("--no-wait", "init")

    def _start_vswitchd(self) -> None:
        _run(["ip", "netns", "exec", self.netns, find_tool("ovs-vswitchd") or "ovs-vswitchd",
              f"unix:{self.db_sock}", f"--pidfile={self.dir / 'ovs-vswitchd.pid'}",
              f"--unixctl={self.vswitchd_ctl}", f"--log-file={self.dir / 'ovs-vswitchd.log'}",
              "--detach", "--no-chdir", "-vconsole:off"], env=self.env)

    def stop(self) -> None:
        """Kill both daemons, delete every namespace and the directory. Safe to call twice."""
        if not self._started:
            return
        self._started = False
        for netns in reversed(self._netns_made):
            _run(["ip", "netns", "del", netns], check=False)
        self._netns_made.clear()
        for daemon, ctl in (("ovs-vswitchd", self.vswitchd_ctl), ("ovsdb-server", self.ovsdb_ctl)):
            self._stop_daemon(daemon, ctl)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.bridges.clear()
        self.vms.clear()
        self.links.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def _stop_daemon(self, daemon: str, ctl: Path) -> None:
        pid = _read_pid(self.dir / f"{daemon}.pid")
        if ctl.exists():
            _run(["ovs-appctl", "-t", str(ctl), "exit"], env=self.env, check=False, timeout=5)
        if pid is not None and not _wait_gone(pid, 3.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 3.0)

    def restart_vswitchd(self, crash: bool = False) -> float:
        """Stop ovs-vswitchd (``ovs-appctl exit`` as ``ovs-ctl restart`` does, or SIGKILL when
        ``crash``) and start it again on the same database. Bridges and ports come back from
        OVSDB (same ofports), flows and conntrack do not: the netdev datapath lives in the
        process. Returns ``time.monotonic()`` just before the new daemon was started."""
        if crash:
            pid = _read_pid(self.dir / "ovs-vswitchd.pid")
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 3.0)
        else:
            self._stop_daemon("ovs-vswitchd", self.vswitchd_ctl)
        started = time.monotonic()
        self._start_vswitchd()
        return started

    def log(self, daemon: str = "ovs-vswitchd") -> str:
        """The daemon's log so far (for failure messages)."""
        path = self.dir / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- raw tools

    def vsctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ovs-vsctl against the sandbox database; returns stdout."""
        cmd = ["ovs-vsctl", f"--db=unix:{self.db_sock}", f"--timeout={int(timeout)}", *args]
        return _run(cmd, env=self.env, timeout=timeout + 5).stdout

    def ofctl(self, command: str, bridge: str, *args: str, input: str | None = None) -> str:
        """Run ``ovs-ofctl -O OpenFlow14 [opts] COMMAND unix:<dir>/<bridge>.mgmt ARGS``."""
        opts = [a for a in args if a.startswith("--")]
        rest = [a for a in args if not a.startswith("--")]
        target = f"unix:{self.dir / (bridge + '.mgmt')}"
        cmd = ["ovs-ofctl", "-O", OF_VERSION, *opts, command, target, *rest]
        return _run(cmd, env=self.env, input=input).stdout

    def appctl(self, *args: str) -> str:
        """Run ovs-appctl against the sandbox's ovs-vswitchd; returns stdout."""
        return _run(["ovs-appctl", "-t", str(self.vswitchd_ctl), *args], env=self.env).stdout

    def wait_revalidated(self) -> None:
        """Wait until the datapath's cached megaflows reflect the OpenFlow tables.

        A flow change is in the tables when ovs-ofctl returns, but packets of an established
        flow keep hitting the old megaflow until a revalidator has run; on a loaded machine
        that can outlast a probe.
        """
        self.appctl("revalidator/wait")

    def ip(self, *args: str, netns: str | None = None) -> str:
        """Run ``ip`` in the sandbox namespace (or another one)."""
        return _run(["ip", "-n", netns or self.netns, *args]).stdout

    # ---- bridges and flows

    def add_bridge(
        self,
        name: str,
        *,
        dpid: int | None = None,
        fail_mode: str = "secure",
        protocols: str = "OpenFlow14,OpenFlow13",
    ) -> str:
        """Create a netdev (userspace datapath) bridge; returns its name."""
        _check_ifname(name)
        settings = ["datapath_type=netdev", f"fail_mode={fail_mode}", f"protocols={protocols}"]
        if dpid is not None:
            settings.append(f"other_config:datapath-id={dpid:016x}")
        self.vsctl("add-br", name, "--", "set", "Bridge", name, *settings)
        self.bridges.append(name)
        return name

    def del_bridge(self, name: str) -> None:
        for vm in [vm for vm in self.vms.values() if vm.bridge == name]:
            self.del_vm_port(vm.name)
        for link in [l for l in self.links if name in (l.bridge_a, l.bridge_b)]:
            self.del_link(link)
        self.vsctl("--if-exists", "del-br", name)
        if name in self.bridges:
            self.bridges.remove(name)

    def add_flows(self, bridge: str, text: str) -> None:
        """Add flows (ovs-ofctl syntax, one a line) in one atomic OF1.4 bundle."""
        self.ofctl("add-flows", bridge, "--bundle", "-", input=_flow_text(text))

    def replace_flows(self, bridge: str, text: str) -> None:
        """Make the bridge's flow table exactly ``text``, atomically (bundle replace-flows)."""
        self.ofctl("replace-flows", bridge, "--bundle", "-", input=_flow_text(text))

    def del_flows(self, bridge: str, match: str | None = None) -> None:
        self.ofctl("del-flows", bridge, *([match] if match else []))

    def dump_flows(self, bridge: str) -> list[str]:
        """The bridge's flows without statistics or reply headers, one string per flow."""
        out = self.ofctl("dump-flows", bridge, "--no-stats")
        return [line.strip() for line in out.splitlines()
                if line.strip() and not re.match(r"^\s*(OFPST|NXST)_FLOW", line)]

    def ofport(self, interface: str) -> int:
        return int(self.vsctl("get", "Interface", interface, "ofport").strip())

    def interface_external_ids(self, interface: str) -> dict[str, str]:
        out = self.vsctl("--format=json", "--columns=external_ids", "list", "Interface",
                         interface)
        kind, pairs = json.loads(out)["data"][0][0]
        assert kind == "map"
        return dict(pairs)

    def odp_ports(self) -> dict[int, OdpPort]:
        return parse_dpif_show(self.appctl("dpif/show"))

    def trace(self, bridge: str, flow: str, ct_next: list[str] | None = None) -> TraceResult:
        """``ovs-appctl ofproto/trace [--ct-next STATE]... BRIDGE FLOW``, parsed.

        ofproto/trace follows every conntrack recirculation by itself; ``ct_next`` gives the
        ct_state of each one in order (OVS defaults the rest to ``trk,new``).
        """
        opts = [arg for state in ct_next or [] for arg in ("--ct-next", state)]
        text = self.appctl("ofproto/trace", *opts, bridge, flow)
        return parse_trace(text, bridge, self.odp_ports())

    def flush_conntrack(self) -> None:
        """Forget all userspace conntrack entries (needs at least one bridge: no datapath else)."""
        self.appctl("dpctl/flush-conntrack")

    # ---- VMs and links

    def add_vm_port(
        self,
        bridge: str,
        name: str,
        *,
        mac: str,
        ip: str,
        ofport: int,
        external_ids: dict[str, str] | None = None,
    ) -> VmPort:
        """A namespace ``<prefix>-<name>`` whose eth0 is veth-linked to bridge port ``name``."""
        _check_ifname(name)
        if name in self.vms:
            raise ValueError(f"VM {name!r} exists already")
        if "/" not in ip:
            raise ValueError(f"ip must carry a prefix length, got {ip!r}")
        vm = VmPort(name=name, netns=f"{self.prefix}-{name}", bridge=bridge, port_name=name,
                    ofport=ofport, mac=mac, ip=ip, external_ids=dict(external_ids or {}))
        self._add_netns(vm.netns)
        self.vms[name] = vm
        self._plumb_vm(vm)
        self._attach(bridge, name, ofport, vm.external_ids)
        return vm

    def _plumb_vm(self, vm: VmPort) -> None:
        self.ip("link", "add", vm.port_name, "type", "veth", "peer", "name", VM_IFACE,
                "netns", vm.netns)
        inside = vm.netns
        self.ip("link", "set", VM_IFACE, "address", vm.mac, netns=inside)
        self.ip("addr", "add", vm.ip, "dev", VM_IFACE, netns=inside)
        self.ip("link", "set", VM_IFACE, "up", netns=inside)
        self.ip("link", "set", "lo", "up", netns=inside)
        # DESIGN.md trap: without this, TCP fails (bad checksums) on the userspace datapath.
        _run(vm.command(["ethtool", "-K", VM_IFACE, "tx", "off"]))
        self.ip("link", "set", vm.port_name, "up")

    def _attach(self, bridge: str, port: str, ofport: int,
                external_ids: dict[str, str] | None = None, extra: Sequence[str] = ()) -> None:
        ids = [f"external_ids:{json.dumps(k)}={json.dumps(v)}"
               for k, v in (external_ids or {}).items()]
        self.vsctl("add-port", bridge, port, "--", "set", "Interface", port,
                   f"ofport_request={ofport}", *ids, *extra)
        got = self.ofport(port)
        if got != ofport:
            raise OvsError(f"port {port} got ofport {got}, wanted {ofport}")

    def del_vm_port(self, name: str) -> None:
        vm = self.vms.pop(name)
        self.vsctl("--if-exists", "del-port", vm.bridge, vm.port_name)
        # Deleting the veth now (both ends) is synchronous; a netns delete frees it lazily.
        _run(["ip", "-n", self.netns, "link", "del", vm.port_name], check=False)
        self._del_netns(vm.netns)

    def migrate_vm_port(self, name: str, bridge: str, port_name: str, ofport: int,
                        between: Callable[[], object] | None = None) -> VmPort:
        """Live-migrate VM ``name`` to ``bridge`` the way libvirt does, the guest (namespace,
        processes, addresses) running throughout: first the destination port, a new veth with the
        same MAC and external_ids, is plugged into ``bridge`` while the source port still carries
        the guest's traffic; ``between()`` runs then; at switchover the guest's eth0 becomes the
        new veth and the source port is deleted from its bridge."""
        _check_ifname(port_name)
        old = self.vms[name]
        staged = "migrating0"
        self.ip("link", "add", port_name, "type", "veth", "peer", "name", staged, "netns", old.netns)
        self.ip("link", "set", staged, "address", old.mac, netns=old.netns)
        self.ip("link", "set", port_name, "up")
        self._attach(bridge, port_name, ofport, old.external_ids)
        if between is not None:
            between()
        self.ip("link", "del", VM_IFACE, netns=old.netns)  # the source tap goes with the old qemu
        self.ip("link", "set", staged, "name", VM_IFACE, netns=old.netns)
        self.ip("addr", "add", old.ip, "dev", VM_IFACE, netns=old.netns)
        self.ip("link", "set", VM_IFACE, "up", netns=old.netns)
        _run(old.command(["ethtool", "-K", VM_IFACE, "tx", "off"]))
        self.vsctl("--if-exists", "del-port", old.bridge, old.port_name)
        new = VmPort(name=old.name, netns=old.netns, bridge=bridge, port_name=port_name, ofport=ofport,
                     mac=old.mac, ip=old.ip, external_ids=dict(old.external_ids))
        self.vms[name] = new
        return new

    def add_patch_or_veth_link(
        self,
        bridge_a: str,
        port_a_ofport: int,
        bridge_b: str,
        port_b_ofport: int,
        *,
        kind: str = "veth",
    ) -> Link:
        """Link two bridges (an "uplink"): a veth pair (default) or patch ports.

        With a veth pair a trace on bridge A ends at A's link port, as on a real hypervisor
        whose uplink is a NIC. With patch ports ofproto/trace continues into bridge B.
        """
        self._link_seq += 1
        port_a, port_b = f"{kind[:2]}{self._link_seq}a", f"{kind[:2]}{self._link_seq}b"
        if kind == "veth":
            self.ip("link", "add", port_a, "type", "veth", "peer", "name", port_b)
            for port in (port_a, port_b):
                self.ip("link", "set", port, "up")
                _run(["ip", "netns", "exec", self.netns, "ethtool", "-K", port, "tx", "off"])
            self._attach(bridge_a, port_a, port_a_ofport)
            self._attach(bridge_b, port_b, port_b_ofport)
        elif kind == "patch":
            self.vsctl("add-port", bridge_a, port_a, "--", "set", "Interface", port_a,
                       "type=patch", f"options:peer={port_b}", f"ofport_request={port_a_ofport}",
                       "--", "add-port", bridge_b, port_b, "--", "set", "Interface", port_b,
                       "type=patch", f"options:peer={port_a}", f"ofport_request={port_b_ofport}")
        else:
            raise ValueError(f"kind must be 'veth' or 'patch', got {kind!r}")
        link = Link(kind, bridge_a, port_a, port_a_ofport, bridge_b, port_b, port_b_ofport)
        self.links.append(link)
        return link

    def del_link(self, link: Link) -> None:
        self.vsctl("--if-exists", "del-port", link.bridge_a, link.port_a, "--",
                   "--if-exists", "del-port", link.bridge_b, link.port_b)
        if link.kind == "veth":
            _run(["ip", "-n", self.netns, "link", "del", link.port_a], check=False)
        self.links.remove(link)

    # ---- checkpoints (per-test cleanup in a session-wide sandbox)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(frozenset(self.bridges), frozenset(self.vms), frozenset(self.links))

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Remove every VM, link and bridge made since ``checkpoint``; flush conntrack."""
        if self.bridges:
            self.flush_conntrack()
        for name in [n for n in self.vms if n not in checkpoint.vms]:
            self.del_vm_port(name)
        for link in [l for l in self.links if l not in checkpoint.links]:
            self.del_link(link)
        for bridge in [b for b in self.bridges if b not in checkpoint.bridges]:
            self.del_bridge(bridge)

    # ---- namespaces

    def _add_netns(self, netns: str) -> None:
        _run(["ip", "netns", "del", netns], check=False)  # a stale one from a killed run
        self._netns_made.append(netns)
        _run(["ip", "netns", "add", netns])

    def _del_netns(self, netns: str) -> None:
        _run(["ip", "netns", "del", netns], check=False)
        if netns in self._netns_made:
            self._netns_made.remove(netns)


def _flow_text(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not line.startswith("#")) + "\n"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has exited


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


# --------------------------------------------------------------------------- traffic


def ping(src: VmPort, dst_ip: str, count: int = 1, timeout: float = 1.0) -> bool:
    """True if ``count`` ICMP echoes from ``src`` to ``dst_ip`` all get replies."""
    deadline = max(1, math.ceil(count * timeout + 0.5))
    proc = src.exec(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", f"{timeout:g}",
                     "-w", str(deadline), dst_ip], timeout=deadline + 5)
    return proc.returncode == 0 and f"{count} received" in proc.stdout


_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError:
    sys.exit(1)
"""


def tcp_connect(src: VmPort, dst_ip: str, port: int, timeout: float = 2.0) -> bool:
    """True if a TCP handshake from ``src`` to ``dst_ip:port`` completes within ``timeout``."""
    proc = src.exec([sys.executable, "-c", _CONNECT, dst_ip, str(port), f"{timeout:g}"],
                    timeout=timeout + 10)
    return proc.returncode == 0


_SERVER = """
import ctypes, socketserver, sys
if len(sys.argv) > 2 and sys.argv[2]:
    ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)  # PR_SET_NAME: /proc/PID/comm
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        for data in iter(lambda: self.request.recv(4096), b""):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
server = socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), Echo)
print("listening", flush=True)
server.serve_forever()
"""


class _Lines:
    """Read lines from a pipe with a timeout (no thread, no blocking)."""

    def __init__(self, stream: object) -> None:
        self._fd = stream.fileno()  # type: ignore[attr-defined]
        self._buf = b""

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._fd], [], [], remaining)[0]:
                return None
            chunk = os.read(self._fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@contextlib.contextmanager
def tcp_server(vm: VmPort, port: int, ready_timeout: float = 10.0, comm: str = "") -> Iterator[VmPort]:
    """An echo server on ``vm``:``port`` that keeps every connection open until closed; its
    process is named ``comm`` (in /proc/PID/comm) when given, as a ``postgres`` would be."""
    proc = vm.popen([sys.executable, "-u", "-c", _SERVER, str(port), comm],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = _Lines(proc.stdout).readline(ready_timeout)
        if line != "listening":
            raise OvsError(f"tcp server on {vm.name}:{port} did not start: {line!r}")
        yield vm
    finally:
        _terminate(proc)


_CLIENT = """
import select, socket, sys, time
try:
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
except OSError as exc:
    print("failed", exc, flush=True)
    sys.exit(1)
sock.settimeout(None)
print("connected", flush=True)
buf = b""
for line in sys.stdin:
    token, wait = line.split()
    want = token.encode() + b"\\n"
    deadline = time.monotonic() + float(wait)
    ok = False
    try:
        sock.sendall(want)
        while True:
            if want in buf:
                buf = buf.split(want, 1)[1]
                ok = True
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                break
            data = sock.recv(4096)
            if not data:
                break
            buf += data
    except OSError:
        pass
    print("ok" if ok else "dead", flush=True)
"""


class EstablishedConnection:
    """One TCP connection held open from a client namespace, checkable again and again.

    ``alive(timeout)`` sends a fresh token and is True if the server echoes it back within
    ``timeout`` seconds. Use as a context manager, or call ``close()``.
    """

    def __init__(self, src: VmPort, dst_ip: str, port: int, connect_timeout: float = 3.0):
        self.src, self.dst_ip, self.port = src, dst_ip, port
        self._seq = 0
        self._proc = src.popen(
            [sys.executable, "-u", "-c", _CLIENT, dst_ip, str(port), f"{connect_timeout:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._lines = _Lines(self._proc.stdout)
        first = self._lines.readline(connect_timeout + 10)
        if first != "connected":
            self.close()
            raise OvsError(f"connection {src.name} -> {dst_ip}:{port} failed: {first!r}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self, timeout: float = 1.0) -> bool:
        if self._proc.poll() is not None or self._proc.stdin is None:
            return False
        self._seq += 1
        try:
            self._proc.stdin.write(f"t{self._seq} {timeout:g}\n".encode())
            self._proc.stdin.flush()
        except OSError:
            return False
        return self._lines.readline(timeout + 5) == "ok"

    def close(self) -> None:
        _terminate(self._proc)
