"""goldilocks-relay: the hypervisor side of the guest channel.

One listening channel per VM (a unix socket per VM in simulation; in production one vsock
port, the peer CID naming the VM through the hypervisor's own records). Whatever arrives on
VM X's channel is about VM X: the guest never says which VM it is, and a message that tries
to is dropped. Accepted messages (well-formed, sequence number above the last accepted one,
within the VM's rate) are forwarded to POST {api}/api/v1/vms/X/context/guest with the relay's
token; the latest context per VM is kept and retried while the API is away.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import messages
from agent.config import (
    Channel,
    ConfigError,
    load_yaml,
    number,
    parse_channel,
    setup_logging,
    vsock_family,
)
from agent.forward import Outcome, post_guest_context, post_rejection
from agent.ratelimit import TokenBucket

log = logging.getLogger("goldilocks-relay")

COUNTERS = (
    "accepted",
    "replayed",
    "malformed",
    "named_vm",
    "rate_limited",
    "forwarded",
    "forward_errors",
    "forward_rejected",
)
MAX_LINE = 256 * 1024
MAX_CONNECTIONS = 4  # per VM; a newer connection closes the oldest
MAX_RETRY_BACKOFF = 5.0
LOG_EVERY = 1.0  # seconds between two log lines of one kind for one VM
REPORT_EVERY = 2.0  # seconds: refused guest messages are reported to the controller's audit log in batches
FORWARD_LOG_EVERY = 10.0
DEFAULT_VSOCK_PORT = 7070
TOKEN_ENV = "GOLDILOCKS_RELAY_TOKEN"


# ---- config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    hypervisor: str
    api: str
    token: str
    vms: dict[str, Channel] = field(default_factory=dict)  # vm -> unix socket
    vsock: dict[int, str] = field(default_factory=dict)  # guest CID -> vm
    vsock_port: int = DEFAULT_VSOCK_PORT
    ttl_seconds: int = 15
    rate: float = 5.0
    burst: float = 10.0
    status_file: str | None = None
    status_interval: float = 1.0
    summary_interval: float = 30.0
    min_forward_interval: float = 1.0
    api_timeout: float = 5.0
    log_level: str = "INFO"


def read_token(data: dict[str, Any]) -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and data.get("token_file"):
        try:
            token = Path(str(data["token_file"])).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token_file: {data['token_file']}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"no relay token: set token_file or {TOKEN_ENV}")
    return token


def _vms(data: dict[str, Any]) -> dict[str, Channel]:
    vms = {}
    for vm, address in (data.get("vms") or {}).items():
        channel = parse_channel(str(address))
        if channel.kind != "unix":
            raise ConfigError(
                f"vms.{vm}: a per-VM channel is a unix socket; map vsock CIDs under vsock:"
            )
        vms[str(vm)] = channel
    return vms


def _vsock(data: dict[str, Any]) -> dict[int, str]:
    cids = data.get("vsock") or {}
    if not isinstance(cids, dict) or not all(str(c).isdigit() for c in cids):
        raise ConfigError("vsock: expected a mapping of guest CIDs to VM uuids")
    return {int(c): str(vm) for c, vm in cids.items()}


def load_config(path: str) -> RelayConfig:
    data = load_yaml(path)
    for key in ("hypervisor", "api"):
        if not data.get(key):
            raise ConfigError(f"{key}: required")
    rate = data.get("rate") or {}
    vms, cids = _vms(data), _vsock(data)
    if not vms and not cids:
        raise ConfigError("no VMs: configure vms: (unix sockets) and/or vsock: (CIDs)")
    return RelayConfig(
        hypervisor=str(data["hypervisor"]),
        api=str(data["api"]),
        token=read_token(data),
        vms=vms,
        vsock=cids,
        vsock_port=int(number(data, "vsock_port", DEFAULT_VSOCK_PORT, 1)),
        ttl_seconds=int(number(data, "ttl_seconds", 15, 1)),
        rate=number(rate, "per_second", 5.0, 0.001),
        burst=number(rate, "burst", 10.0, 1.0),
        status_file=str(data["status_file"]) if data.get("status_file") else None,
        status_interval=number(data, "status_interval", 1.0, 0.05),
        summary_interval=number(data, "summary_interval", 30.0, 0.05),
        min_forward_interval=number(data, "min_forward_interval", 1.0),
        api_timeout=number(data, "api_timeout", 5.0, 0.1),
        log_level=str(data.get("log_level", "INFO")),
    )


# ---- one VM ---------------------------------------------------------------------------------


Job = tuple[dict[str, Any], float]  # checked context, guest's sent_at


class VmState:
    """Everything the relay knows about one VM's channel; guarded by `cond`."""

    def __init__(self, vm: str, config: RelayConfig) -> None:
        self.vm = vm
        self.config = config
        self.cond = threading.Condition()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.bucket = TokenBucket(config.rate, config.burst)
        self.last_seq: int | None = None
        self.pending: Job | None = None
        self.last_forwarded: dict[str, Any] | None = None
        self.last_forward_at = float("-inf")  # monotonic
        self.last_error: str | None = None
        self.connections: list[socket.socket] = []
        self._logged: dict[str, float] = {}
        self.unreported: dict[str, tuple[int, str]] = {}  # reason -> (count, last detail)

    def receive(self, line: bytes) -> str:
        """Check one line from the VM's channel; returns "accepted" or the counter it went to."""
        try:
            msg = messages.parse(line)
        except messages.Drop as drop:
            return self.drop(drop.reason, drop.detail)
        with self.cond:
            if self.last_seq is not None and msg.seq <= self.last_seq:
                return self.drop(
                    "replayed", f"seq {msg.seq} is not above the last accepted {self.last_seq}"
                )
            if not self.bucket.take(time.monotonic()):
                return self.drop(
                    "rate_limited", f"over {self.config.rate:g}/s (burst {self.config.burst:g})"
                )
            self.last_seq = msg.seq
            self.counters["accepted"] += 1
            self.pending = (msg.context, msg.sent_at)
            self.cond.notify_all()
        return "accepted"

    def drop(self, reason: str, detail: str) -> str:
        with self.cond:
            self.counters[reason] += 1
            count, _ = self.unreported.get(reason, (0, ""))
            self.unreported[reason] = (count + 1, detail)
            if self._may_log(reason, LOG_EVERY):
                log.warning(
                    "vm %s: dropped (%s): %s [%s so far]",
                    self.vm,
                    reason,
                    detail,
                    self.counters[reason],
                )
        return reason

    def _may_log(self, kind: str, every: float) -> bool:
        """At most one log line of a kind per `every` seconds (a guest must not flood the log)."""
        now = time.monotonic()
        if now - self._logged.get(kind, float("-inf")) < every:
            return False
        self._logged[kind] = now
        return True

    def next_job(self, stop: threading.Event) -> Job | None:
        """The latest context to forward, once it may go (None when stopping).

        A context that differs from the last forwarded one goes at once; an unchanged one (a
        heartbeat, refreshing the TTL) at most once per `min_forward_interval`.
        """
        with self.cond:
            while not stop.is_set():
                wait = 0.5
                if self.pending is not None:
                    wait = self._wait_before(self.pending[0])
                    if wait <= 0:
                        job, self.pending = self.pending, None
                        return job
                self.cond.wait(min(wait, 0.5))
        return None

    def _wait_before(self, context: dict[str, Any]) -> float:
        if context != self.last_forwarded:
            return 0.0
        return self.last_forward_at + self.config.min_forward_interval - time.monotonic()

    def forwarded(self, job: Job, outcome: Outcome) -> None:
        with self.cond:
            self.last_forward_at = time.monotonic()
            if outcome.ok:
                self.counters["forwarded"] += 1
                self.last_forwarded, self.last_error = job[0], None
                return
            self.last_error = (
                f"HTTP {outcome.status}: {outcome.detail}" if outcome.status else outcome.detail
            )
            if outcome.retry:
                self.counters["forward_errors"] += 1
                if self.pending is None:
                    self.pending = job  # keep the latest context for the retry
            else:
                self.counters["forward_rejected"] += 1
            counter = "forward_errors" if outcome.retry else "forward_rejected"
            if self._may_log(counter, FORWARD_LOG_EVERY):
                log.warning(
                    "vm %s: forward failed (%s, %d so far): %s",
                    self.vm,
                    "will retry" if outcome.retry else "refused by the API",
                    self.counters[counter],
                    self.last_error,
                )

    def attach(self, conn: socket.socket) -> None:
        with self.cond:
            self.connections.append(conn)
            excess = self.connections[:-MAX_CONNECTIONS]
        for old in excess:
            log.info(
                "vm %s: more than %d connections, closing the oldest", self.vm, MAX_CONNECTIONS
            )
            _shutdown(old)

    def detach(self, conn: socket.socket) -> None:
        with self.cond:
            if conn in self.connections:
                self.connections.remove(conn)

    def status(self) -> dict[str, Any]:
        with self.cond:
            return {
                **self.counters,
                "last_seq": self.last_seq,
                "last_error": self.last_error,
                "connections": len(self.connections),
                "pending": self.pending is not None,
            }


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---- channels -------------------------------------------------------------------------------


def serve_connection(conn: socket.socket, state: VmState, stop: threading.Event) -> None:
    """Read JSON lines from one connection until it closes."""
    state.attach(conn)
    conn.settimeout(1.0)
    buf = b""
    try:
        while not stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    state.receive(line)
            if len(buf) > MAX_LINE:
                state.drop(
                    "malformed", f"line longer than {MAX_LINE} bytes; closing the connection"
                )
                break
    finally:
        state.detach(conn)
        conn.close()


def unix_listener(path: str) -> socket.socket:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and stat.S_ISSOCK(target.stat().st_mode):
        if _live(path):
            raise OSError(f"{path}: another process is listening there")
        target.unlink()  # a stale socket of an earlier relay
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def _live(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def vsock_listener(port: int) -> socket.socket:
    sock = socket.socket(vsock_family(), socket.SOCK_STREAM)
    sock.bind((getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF), port))
    sock.listen(64)
    return sock


Resolver = Callable[[Any], VmState | None]


def accept_loop(
    listener: socket.socket, resolve: Resolver, stop: threading.Event, name: str
) -> None:
    listener.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            if not stop.is_set():
                log.exception("%s: accept failed", name)
                time.sleep(0.5)
            continue
        state = resolve(peer)
        if state is None:
            log.warning("%s: connection from unknown peer %r refused", name, peer)
            conn.close()
            continue
        threading.Thread(
            target=serve_connection, args=(conn, state, stop), name=f"conn-{state.vm}", daemon=True
        ).start()


# ---- the relay ------------------------------------------------------------------------------


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        vms = list(config.vms) + [vm for vm in config.vsock.values() if vm not in config.vms]
        self.states = {vm: VmState(vm, config) for vm in vms}
        self.listeners: list[socket.socket] = []
        self.paths: list[str] = []
        self.unknown_peers = 0

    def start(self) -> None:
        """Bind every channel (raises OSError if one cannot be), then start the threads."""
        for vm, channel in self.config.vms.items():
            sock = unix_listener(channel.path)
            self.listeners.append(sock)
            self.paths.append(channel.path)
            state = self.states[vm]
            self._thread(accept_loop, sock, lambda _peer, s=state: s, self.stop, str(channel))
        if self.config.vsock:
            sock = vsock_listener(self.config.vsock_port)
            self.listeners.append(sock)
            self._thread(
                accept_loop, sock, self._by_cid, self.stop, f"vsock:{self.config.vsock_port}"
            )
        for state in self.states.values():
            self._thread(self._forward_loop, state)
        self._thread(self._report_loop)
        log.info(
            "relay for %s up: %d VMs, API %s",
            self.config.hypervisor,
            len(self.states),
            self.config.api,
        )

    def _thread(self, target: Callable[..., None], *args: Any) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    def _by_cid(self, peer: Any) -> VmState | None:
        """The hypervisor's records, not the guest, say which VM a vsock peer is."""
        vm = self.config.vsock.get(peer[0]) if isinstance(peer, tuple) else None
        if vm is None:
            self.unknown_peers += 1
            return None
        return self.states[vm]

    def _forward_loop(self, state: VmState) -> None:
        backoff = 0.0
        while (job := state.next_job(self.stop)) is not None:
            body = messages.api_body(job[0], job[1], time.time(), self.config.ttl_seconds)
            outcome = post_guest_context(
                self.config.api, self.config.token, state.vm, body, self.config.api_timeout
            )
            state.forwarded(job, outcome)
            backoff = min(MAX_RETRY_BACKOFF, max(0.5, backoff * 2)) if outcome.retry else 0.0
            if backoff:
                self.stop.wait(backoff)

    def _report_loop(self) -> None:
        """Tell the controller what was refused, so its audit log has it (batched per reason)."""
        while not self.stop.wait(REPORT_EVERY):
            for state in self.states.values():
                with state.cond:
                    batch, state.unreported = state.unreported, {}
                for reason, (count, detail) in sorted(batch.items()):
                    outcome = post_rejection(self.config.api, self.config.token, state.vm,
                                             {"reason": reason, "count": count, "detail": detail[:500]},
                                             self.config.api_timeout)
                    if outcome.retry:
                        with state.cond:  # keep it for the next round
                            again, _ = state.unreported.get(reason, (0, detail))
                            state.unreported[reason] = (again + count, detail)

    def status(self) -> dict[str, Any]:
        return {
            "hypervisor": self.config.hypervisor,
            "updated_at": time.time(),
            "unknown_peers": self.unknown_peers,
            "vms": {vm: state.status() for vm, state in sorted(self.states.items())},
        }

    def write_status(self) -> None:
        if self.config.status_file is None:
            return
        target = Path(self.config.status_file)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.status(), indent=2, sort_keys=True))
            tmp.replace(target)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", target, exc)

    def summary(self) -> str:
        parts = []
        for vm, st in self.status()["vms"].items():
            counts = " ".join(f"{k}={st[k]}" for k in COUNTERS if st[k])
            parts.append(f"{vm}[{counts or 'idle'}]")
        return f"relay {self.config.hypervisor}: " + " ".join(parts)

    def run(self) -> None:
        """Until stopped: write the status file, log a summary now and then."""
        next_summary = time.monotonic() + self.config.summary_interval
        self.write_status()
        while not self.stop.wait(self.config.status_interval):
            self.write_status()
            if time.monotonic() >= next_summary:
                log.info("%s", self.summary())
                next_summary = time.monotonic() + self.config.summary_interval
        self.shutdown()

    def shutdown(self) -> None:
        self.stop.set()
        for sock in self.listeners:
            sock.close()
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for state in self.states.values():
            with state.cond:
                state.cond.notify_all()
                conns = list(state.connections)
            for conn in conns:
                _shutdown(conn)
        self.write_status()
        log.info("%s", self.summary())
        log.info("relay stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goldilocks-relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"goldilocks-relay: {exc}", file=sys.stderr)
        return 2
    setup_logging("goldilocks-relay", config.log_level)
    relay = Relay(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: relay.stop.set())
    try:
        relay.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        relay.shutdown()
        return 1
    relay.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
