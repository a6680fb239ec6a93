"""Listening sockets and the processes that own them, from /proc (Linux).

/proc/net/{tcp,tcp6,udp,udp6} list the sockets of the reader's network namespace; socket
inodes are mapped to processes through /proc/<pid>/fd symlinks ("socket:[inode]"), and a
process counts only when it is in the same network namespace as the agent (in a simulation
every VM shares the process table; in a VM this is every ordinary process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"
TCP_CLOSE = "07"  # an unconnected UDP socket
TABLES = (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp"))
COMM_LEN = 15  # the kernel truncates process names (TASK_COMM_LEN - 1)


@dataclass(frozen=True)
class Listener:
    protocol: str  # "tcp" | "udp"
    port: int
    inode: int


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def _listening(protocol: str, fields: list[str]) -> bool:
    state = fields[3]
    if protocol == "tcp":
        return state == TCP_LISTEN
    return state == TCP_CLOSE and _port(fields[2]) == 0


def parse_table(text: str, protocol: str) -> list[Listener]:
    """Listening (tcp) or unconnected bound (udp) sockets of one /proc/net table."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or not _listening(protocol, fields):
            continue
        inode, port = int(fields[9]), _port(fields[1])
        if inode and port:
            found.append(Listener(protocol, port, inode))
    return found


def listeners(proc: str = "/proc") -> list[Listener]:
    found: list[Listener] = []
    for name, protocol in TABLES:
        try:
            text = Path(proc, "net", name).read_text()
        except OSError:
            continue  # e.g. no IPv6
        found.extend(parse_table(text, protocol))
    return found


def _netns(proc: str, pid: str) -> str | None:
    try:
        return os.readlink(os.path.join(proc, pid, "ns", "net"))
    except OSError:
        return None


def processes(proc: str = "/proc") -> Iterator[tuple[int, str]]:
    """(pid, comm) of every readable process in the reader's network namespace."""
    mine = _netns(proc, "self")
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        if mine is not None and _netns(proc, pid) != mine:
            continue
        try:
            comm = Path(proc, pid, "comm").read_text().strip()
        except OSError:
            continue  # exited, or not ours to read
        yield int(pid), comm


def socket_inodes(proc: str, pid: int) -> set[int]:
    inodes = set()
    fd_dir = os.path.join(proc, str(pid), "fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in names:
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[8:-1]))
    return inodes


def app_names(apps: dict[str, list[str]]) -> dict[str, str]:
    """Process name (as the kernel truncates it) -> app name, from the config's `apps:` map."""
    return {comm[:COMM_LEN]: app for app, comms in apps.items() for comm in comms}


def running_apps(apps: dict[str, list[str]], proc: str = "/proc") -> dict[str, list[str]]:
    """{app: sorted ["tcp/5432", ...]} for every allowlisted process running; others ignored."""
    names = app_names(apps)
    by_inode = {listener.inode: listener for listener in listeners(proc)}
    found: dict[str, set[tuple[str, int]]] = {}
    for pid, comm in processes(proc):
        app = names.get(comm)
        if app is None:
            continue
        ports = found.setdefault(app, set())
        for inode in socket_inodes(proc, pid) & by_inode.keys():
            ports.add((by_inode[inode].protocol, by_inode[inode].port))
    return {
        app: [f"{proto}/{port}" for proto, port in sorted(ports)]
        for app, ports in sorted(found.items())
    }
