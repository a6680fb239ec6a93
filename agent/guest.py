"""goldilocks-agent: the in-guest agent.

Observes the guest (agent.observe) every `interval` seconds and sends, over its per-VM
channel, a JSON line {"seq", "kind", "sent_at", "context"}: a "report" when the context
changed, a "heartbeat" (same full context) every `heartbeat` seconds otherwise. It never
names its VM: the relay on the hypervisor knows which VM a channel belongs to.
"""

from __future__ import annotations

import argparse
import json
import logging
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.config import (
    Channel,
    ConfigError,
    connect,
    list_map,
    load_yaml,
    number,
    parse_channel,
    setup_logging,
    string_list,
    string_map,
)
from agent.observe import Observer

MAX_BACKOFF = 5.0
SEND_TIMEOUT = 5.0

log = logging.getLogger("goldilocks-agent")


@dataclass(frozen=True)
class AgentConfig:
    channel: Channel
    interval: float
    heartbeat: float
    observer: Observer
    log_level: str = "INFO"


def load_config(path: str) -> AgentConfig:
    data = load_yaml(path)
    if "channel" not in data:
        raise ConfigError("channel: required (unix:/path or vsock:CID:PORT)")
    observer = Observer(
        utmp_path=str(data.get("utmp", "/var/run/utmp")),
        groups=list_map(data, "groups"),
        apps=list_map(data, "apps"),
        os_release=str(data.get("os_release", "/etc/os-release")),
        labels=string_list(data, "labels"),
        posture=string_map(data, "posture"),
        posture_timeout=number(data, "posture_timeout", 5.0, 0.01),
        posture_interval=number(data, "posture_interval", 10.0),
        proc=str(data.get("proc", "/proc")),
    )
    return AgentConfig(
        parse_channel(data["channel"]),
        number(data, "interval", 1.0, 0.01),
        number(data, "heartbeat", 5.0, 0.01),
        observer,
        str(data.get("log_level", "INFO")),
    )


class Sender:
    """The channel to the relay: connects lazily, with backoff; never raises on I/O errors."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.sock: socket.socket | None = None
        self.backoff = 0.0
        self.next_try = 0.0

    @property
    def connected(self) -> bool:
        return self.sock is not None and not self._peer_closed()

    def ensure(self, now: float) -> bool:
        """Connected? Tries to (re)connect when the backoff allows; True if a new connection."""
        if self.connected or now < self.next_try:
            return False
        self.close()
        try:
            self.sock = connect(self.channel, SEND_TIMEOUT)
        except OSError as exc:
            self.backoff = min(MAX_BACKOFF, max(0.2, self.backoff * 2))
            self.next_try = now + self.backoff
            log.debug(
                "cannot reach relay at %s: %s (retry in %.1f s)", self.channel, exc, self.backoff
            )
            return False
        log.info("connected to relay at %s", self.channel)
        self.backoff = 0.0
        return True

    def send(self, line: bytes) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendall(line)
            return True
        except OSError as exc:  # broken pipe, reset, timeout: reconnect on the next round
            log.warning("relay connection lost: %s", exc)
            self.close()
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _peer_closed(self) -> bool:
        """The relay never writes; a readable socket means it closed (or sent junk to drain)."""
        assert self.sock is not None
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable and not self.sock.recv(4096, socket.MSG_DONTWAIT):
                self.close()
                return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.close()
            return True
        return False


def message(seq: int, kind: str, context: dict[str, Any], now: float) -> bytes:
    body = {"seq": seq, "kind": kind, "sent_at": now, "context": context}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode() + b"\n"


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.sender = Sender(config.channel)
        self.seq = time.time_ns() // 1000  # strictly increasing across restarts
        self.last_sent: dict[str, Any] | None = None
        self.last_sent_at = float("-inf")
        self.stop = threading.Event()

    def step(self) -> None:
        context = self.config.observer.collect()
        now = time.monotonic()
        fresh = self.sender.ensure(now)
        if self.sender.sock is None:
            return
        changed = fresh or context != self.last_sent
        if changed or now - self.last_sent_at >= self.config.heartbeat:
            self.seq += 1
            kind = "report" if changed else "heartbeat"
            if self.sender.send(message(self.seq, kind, context, time.time())):
                self.last_sent, self.last_sent_at = context, now

    def run(self) -> None:
        log.info(
            "agent up: channel %s, interval %.1f s, heartbeat %.1f s",
            self.config.channel,
            self.config.interval,
            self.config.heartbeat,
        )
        while not self.stop.is_set():
            self.step()
            self.stop.wait(self._pause())
        self.sender.close()
        log.info("agent stopped")

    def _pause(self) -> float:
        if self.sender.sock is None:
            return max(0.05, min(self.config.interval, self.sender.next_try - time.monotonic()))
        return self.config.interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goldilocks-agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"goldilocks-agent: {exc}", file=sys.stderr)
        return 2
    setup_logging("goldilocks-agent", config.log_level)
    agent = Agent(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
