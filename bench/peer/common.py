"""What both sides share: bound ports on a private OVS, flow counts, polling, RSS, statistics."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from apps.restore import (
    AGGREGATE_ALL,
    OFP_HEADER,
    OFP_VERSION,
    OFPMP_AGGREGATE,
    OFPT_ECHO_REPLY,
    OFPT_ECHO_REQUEST,
    OFPT_ERROR,
    OFPT_HELLO,
    OFPT_MULTIPART_REPLY,
    OFPT_MULTIPART_REQUEST,
)
from bench.peer.workload import Vm, Workload
from tests.ovs.harness import OvsSandbox, VmPort, ping, tcp_connect, tcp_server

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
PORTS_PER_TRANSACTION = 200
WAIT = 600.0  # seconds: a step that takes longer fails the run


class BenchError(RuntimeError):
    """A step of the benchmark did not do what it should."""


# ---- statistics


@dataclass(frozen=True)
class Summary:
    median: float
    p95: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Summary:
        ordered = sorted(values)
        if not ordered:
            raise BenchError("no measurement to summarize")
        return Summary(statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
                       len(ordered))

    def ms(self) -> dict[str, float | int]:
        return {"median_ms": round(self.median * 1000, 1), "p95_ms": round(self.p95 * 1000, 1), "n": self.n}


# ---- waiting


def poll(what: str, check: Callable[[], bool], timeout: float = WAIT, every: float = 0.002) -> float:
    """Poll `check` back to back (sleeping `every`); the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(every)
    raise BenchError(f"timed out after {timeout:g} s waiting for {what}")


def settle(what: str, sample: Callable[[], T], quiet: float = 1.0, timeout: float = WAIT) -> T:
    """Sample until the value stays the same for `quiet` seconds; that value."""
    last, since = sample(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = sample()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise BenchError(f"{what} did not settle within {timeout:g} s")


# ---- flows on a bridge


@dataclass(frozen=True)
class FlowCount:
    total: int
    conjunctive: int

    @staticmethod
    def of(lines: Sequence[str]) -> FlowCount:
        flows = [line for line in lines if "actions=" in line]
        return FlowCount(len(flows), sum(1 for line in flows if "conjunction(" in line))


def flow_lines(ovs: OvsSandbox, bridge: str, match: str | None = None) -> list[str]:
    return [line for line in ovs.dump_flows(bridge) if "actions=" in line] if match is None else \
        [line.strip() for line in ovs.ofctl("dump-flows", bridge, "--no-stats", match).splitlines() if "actions=" in line]


_FLOW_COUNT = re.compile(r"flow_count=(\d+)")


def flow_count(ovs: OvsSandbox, bridge: str, match: str = "") -> int:
    """Flows on the bridge (under `match`), from one cheap dump-aggregate."""
    out = ovs.ofctl("dump-aggregate", bridge, *([match] if match else []))
    found = _FLOW_COUNT.search(out)
    if not found:
        raise BenchError(f"no flow_count in dump-aggregate: {out!r}")
    return int(found.group(1))


class BridgeWatch:
    """`ovs-ofctl monitor BRIDGE watch:!initial`, each flow event timestamped on arrival.

    OVS reports a flow table change to monitors as it applies it, so the last event after a
    change is when the bridge finished taking it (whoever sent it), without polling."""

    def __init__(self, ovs: OvsSandbox, bridge: str) -> None:
        self._proc = subprocess.Popen(["ovs-ofctl", "-O", "OpenFlow14", "monitor", f"unix:{ovs.dir / (bridge + '.mgmt')}",
                                       "watch:!initial"], env=ovs.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._events: list[float] = []
        self._said: deque[str] = deque(maxlen=5)  # its last lines that were not flow events
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):  # the reply to the monitor request: watching from now on
            self.close()
            raise BenchError(f"ovs-ofctl monitor on {bridge} did not start")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(b"OFPST_FLOW_MONITOR reply"):
                self._ready.set()
            elif line.startswith(b" event="):
                with self._lock:
                    self._events.append(time.monotonic())
            else:
                self._said.append(line.decode(errors="replace").rstrip())

    def state(self) -> str:
        """Whether the monitor still runs, and what it last said besides flow events."""
        code = self._proc.poll()
        running = "running" if code is None else f"exited ({code})"
        return f"ovs-ofctl monitor {running}; its last other output: {list(self._said) or 'none'}"

    def last_since(self, start: float) -> float | None:
        """Monotonic time of the last flow event at or after `start` (None: no event)."""
        with self._lock:
            return self._events[-1] if self._events and self._events[-1] >= start else None

    def wait_quiet(self, start: float, quiet: float = 0.2, timeout: float = WAIT) -> float:
        """Once events came after `start` and then none for `quiet` seconds: the last one's time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.last_since(start)
            if last is not None and time.monotonic() - last >= quiet:
                return last
            time.sleep(0.01)
        raise BenchError(f"no flow event on the bridge within {timeout:g} s")

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait(timeout=5)
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- ports: most VMs are internal ports (no namespace), the probes real namespaces


_MULTIPART_HEADER = struct.Struct("!HH4x")  # type, flags, pad
_AGGREGATE_COUNT = struct.Struct("!16xI")  # after the multipart header: packets, bytes, then flows


def _read_message(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One OpenFlow message off the socket: (version, type, xid, body)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise BenchError("the switch closed the OpenFlow connection")
            data += chunk
        return data

    version, kind, length, xid = OFP_HEADER.unpack(exactly(OFP_HEADER.size))
    return version, kind, xid, exactly(length - OFP_HEADER.size)


class _OwnsSocket:
    """Something holding one socket, closed with it (also as a context manager)."""

    _sock: socket.socket

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FlowCounter(_OwnsSocket):
    """Flows on a bridge, counted over one OpenFlow connection to its management socket: an
    aggregate request per count, as `ovs-ofctl dump-aggregate` sends, without starting a
    process each time (several milliseconds of CPU on these 2 cores, taken from the systems
    being timed, and as many of delay before the count is seen)."""

    def __init__(self, ovs: OvsSandbox, bridge: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(10)
        self._xid = 1
        try:
            self._sock.connect(str(ovs.dir / f"{bridge}.mgmt"))
            self._sock.sendall(OFP_HEADER.pack(OFP_VERSION, OFPT_HELLO, OFP_HEADER.size, self._xid))
            theirs, kind, _, _ = _read_message(self._sock)
            if kind != OFPT_HELLO or theirs < OFP_VERSION:
                raise BenchError(f"the switch answered hello with version {theirs}, message type {kind}")
        except BaseException:
            self._sock.close()
            raise

    def count(self) -> int:
        self._xid += 1
        body = _MULTIPART_HEADER.pack(OFPMP_AGGREGATE, 0) + AGGREGATE_ALL
        self._sock.sendall(OFP_HEADER.pack(OFP_VERSION, OFPT_MULTIPART_REQUEST, OFP_HEADER.size + len(body),
                                            self._xid) + body)
        while True:
            _, kind, xid, body = _read_message(self._sock)
            if kind == OFPT_ECHO_REQUEST:  # an idle connection is probed; unanswered, OVS drops it
                self._sock.sendall(OFP_HEADER.pack(OFP_VERSION, OFPT_ECHO_REPLY, OFP_HEADER.size + len(body), xid)
                                   + body)
            elif kind == OFPT_ERROR and xid == self._xid:
                raise BenchError(f"the switch refused the aggregate request: {body.hex()}")
            elif kind == OFPT_MULTIPART_REPLY and xid == self._xid:
                return int(_AGGREGATE_COUNT.unpack_from(body, _MULTIPART_HEADER.size)[0])


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): asked for listening sockets only, the kernel
# walks just its listening hash. /proc/PID/net/tcp walks the established hash of every namespace
# too: ~5 ms a read on this 24 GiB machine, which a restart's poll paid each time.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_NLMSG_HEADER = struct.Struct("=IHHII")
_INET_DIAG_REQ_V2 = struct.Struct("=BBBxI48x")  # family, protocol, extensions, states, the socket id
_INET_DIAG_MSG_SPORT = struct.Struct("!4xH")  # family, state, timer, retrans; the id's source port


class TcpListeners(_OwnsSocket):
    """Which TCP ports have a listening socket in one network namespace, asked of the kernel
    over a netlink socket made inside it."""

    def __init__(self, namespace: str) -> None:
        with netns(namespace):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
        self._seq = 0

    def ports(self) -> frozenset[int]:
        found: set[int] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            found |= self._dump(family)
        return frozenset(found)

    def listening(self, port: int) -> bool:
        return port in self.ports()

    def _dump(self, family: int) -> set[int]:
        self._seq += 1
        request = _INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
        self._sock.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                           _NLM_F_REQUEST | _NLM_F_DUMP, self._seq, 0) + request)
        ports: set[int] = set()
        while True:
            data, offset = self._sock.recv(1 << 16), 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _, seq, _ = _NLMSG_HEADER.unpack_from(data, offset)
                body = offset + _NLMSG_HEADER.size
                if seq == self._seq:
                    if kind == _NLMSG_DONE:
                        return ports
                    if kind == _NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, body)[0]
                        raise BenchError(f"sock_diag refused the dump of family {family}: {os.strerror(code)}")
                    ports.add(_INET_DIAG_MSG_SPORT.unpack_from(data, body)[0])
                offset += (length + 3) & ~3
                if length < _NLMSG_HEADER.size:
                    raise BenchError(f"sock_diag sent a message of {length} bytes")


def echo_round_trip(ovs: OvsSandbox, bridge: str, reps: int = 30) -> dict[str, Any]:
    """OpenFlow echo request → reply on the bridge's management socket, timed: what a round
    trip with this switch costs apart from any flow change, for either controller."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(ovs.dir / f"{bridge}.mgmt"))
        sock.sendall(OFP_HEADER.pack(0x06, OFPT_HELLO, OFP_HEADER.size, 1))
        theirs, kind, _, _ = _read_message(sock)
        if kind != OFPT_HELLO:
            raise BenchError(f"the switch answered hello with message type {kind}")
        version, times = min(theirs, 0x06), []
        for xid in range(2, 2 + reps):
            start = time.monotonic()
            sock.sendall(OFP_HEADER.pack(version, OFPT_ECHO_REQUEST, OFP_HEADER.size, xid))
            while _read_message(sock)[1:3] != (OFPT_ECHO_REPLY, xid):
                pass
            times.append(time.monotonic() - start)
    return Summary.of(times).ms()


def plug_ports(ovs: OvsSandbox, bridge: str, workload: Workload, ids: Callable[[Vm], dict[str, str]]) -> dict[str, VmPort]:
    """Bind every VM of the workload to the bridge (external_ids from `ids`); the probe VMs are
    network namespaces on veth pairs, the others OVS internal ports in the sandbox namespace."""
    probes = {vm.name for vm in workload.probes}
    others = [vm for vm in workload.vms if vm.name not in probes]
    for start in range(0, len(others), PORTS_PER_TRANSACTION):
        args: list[str] = []
        for vm in others[start:start + PORTS_PER_TRANSACTION]:
            args += ["--", "add-port", bridge, vm.name, "--", "set", "Interface", vm.name, "type=internal",
                     f"ofport_request={vm.ofport}", *(f'external_ids:"{k}"="{v}"' for k, v in ids(vm).items())]
        ovs.vsctl(*args[1:])
    return {vm.name: ovs.add_vm_port(bridge, vm.name, mac=vm.mac, ip=f"{vm.ip}/16", ofport=vm.ofport,
                                     external_ids=ids(vm)) for vm in workload.probes}


def ports_bound(ovs: OvsSandbox, workload: Workload) -> bool:
    """Every VM's interface has its requested ofport."""
    out = ovs.vsctl("--format=csv", "--no-headings", "--columns=name,ofport", "list", "Interface")
    got = dict(line.split(",", 1) for line in out.splitlines() if "," in line)
    return all(got.get(vm.name) == str(vm.ofport) for vm in workload.vms)


# ---- the traffic check


@dataclass(frozen=True)
class Check:
    src: str
    dst: str
    service: str
    want: bool
    got: bool

    @property
    def held(self) -> bool:
        return self.want == self.got


def traffic_check(ports: dict[str, VmPort], workload: Workload) -> list[Check]:
    """Real TCP connects and pings between the probe VMs; allowed pairs must pass, denied drop."""
    warm_paths(ports, workload)
    with contextlib.ExitStack() as stack:
        for name, tcp_ports in workload.servers.items():
            for port in tcp_ports:
                stack.enter_context(tcp_server(ports[name], port))
        out = []
        for src, dst, port, want in workload.checks:
            got = ping(ports[src.name], dst.ip, count=2) if port is None else \
                tcp_connect(ports[src.name], dst.ip, port, timeout=1.5)
            out.append(Check(src.name, dst.name, "icmp" if port is None else f"tcp/{port}", want, got))
        return out


def warm_paths(ports: dict[str, VmPort], workload: Workload) -> None:
    """Resolve ARP between the probes once, so the first checked packet is not the first ever."""
    for src in workload.probes:
        for dst in workload.probes:
            if src != dst:
                ping(ports[src.name], dst.ip, count=1, timeout=0.5)


# ---- processes


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run this thread inside network namespace `name` (sockets made here stay in it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        yield
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(target)
        os.close(home)
