"""What a guest agent reports: users, groups (if configured), apps, OS, labels, posture."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import procnet, utmp

log = logging.getLogger("goldilocks-agent")

# What the controller accepts as a user, app or label name (controller.api.schemas.NAME_PATTERN).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}")
MAX_OS = 128


@dataclass
class Observer:
    """Collects the guest context; posture checks are cached for `posture_interval` seconds."""

    utmp_path: str = "/var/run/utmp"
    groups: dict[str, list[str]] = field(default_factory=dict)
    apps: dict[str, list[str]] = field(default_factory=dict)
    os_release: str = "/etc/os-release"
    labels: list[str] = field(default_factory=list)
    posture: dict[str, str] = field(default_factory=dict)
    posture_timeout: float = 5.0
    posture_interval: float = 10.0
    proc: str = "/proc"
    _posture_cache: dict[str, str] = field(default_factory=dict)
    _posture_at: float = float("-inf")
    _warned: set[str] = field(default_factory=set)

    def collect(self) -> dict[str, Any]:
        users = self._guard("users", self.users, [])
        context: dict[str, Any] = {
            "users": users,
            "apps": self._guard("apps", lambda: procnet.running_apps(self.apps, self.proc), {}),
            "os": self._guard("os", lambda: read_os(self.os_release), None),
            "labels": sorted(set(self.labels)),
            "posture": self._guard("posture", self.posture_results, {}),
        }
        if self.groups:
            context["groups"] = {u: sorted(self.groups[u]) for u in users if u in self.groups}
        return context

    def users(self) -> list[str]:
        names = utmp.logged_in_users(self.utmp_path)
        for bad in (n for n in names if not NAME_RE.fullmatch(n)):
            self._warn_once(
                f"user:{bad}", f"ignoring user {bad!r}: not a name the controller accepts"
            )
        return [n for n in names if NAME_RE.fullmatch(n)]

    def posture_results(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._posture_at >= self.posture_interval:
            self._posture_cache = {
                name: run_check(cmd, self.posture_timeout)
                for name, cmd in sorted(self.posture.items())
            }
            self._posture_at = now
        return dict(self._posture_cache)

    def _guard(self, what: str, fn: Any, default: Any) -> Any:
        """Observation must never kill the agent: log once and report `default`."""
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - any failure of one observation
            self._warn_once(what, f"cannot observe {what}: {exc}")
            return default
        self._warned.discard(what)
        return result

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def run_check(command: str, timeout: float) -> str:
    """A posture check: the shell command's exit status 0 = "pass"; anything else = "fail".

    A check still running after `timeout` seconds fails, and its whole process group is killed.
    """
    try:
        child = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("posture check %s cannot run: %s", shlex.quote(command), exc)
        return "fail"
    try:
        status = child.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("posture check %s timed out after %.1f s", shlex.quote(command), timeout)
        _kill_group(child)
        return "fail"
    return "pass" if status == 0 else "fail"


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        pass
    child.wait()


def parse_os_release(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            try:
                values[key] = "".join(shlex.split(value)) if value else ""
            except ValueError:
                values[key] = value.strip("\"'")
    return values


def read_os(path: str) -> str | None:
    """PRETTY_NAME, else ID, of an os-release file; None when there is none."""
    try:
        values = parse_os_release(Path(path).read_text())
    except FileNotFoundError:
        return None
    name = values.get("PRETTY_NAME") or values.get("ID")
    return name[:MAX_OS] if name else None
