"""The guest -> relay message: parse and check one JSON line, and map it to the API body.

A line is {"seq": int, "kind": "report"|"heartbeat", "sent_at": epoch, "context": {...}}.
Everything the guest says is checked against what the controller accepts
(POST /api/v1/vms/{vm}/context/guest), so a guest cannot make the relay send a request the
API would refuse. Unknown context keys are ignored (not forwarded); a key naming a VM
anywhere at the top of the message or of its context drops the message.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}")  # controller.api.schemas.NAME_PATTERN
CHECK_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # posture check keys
PORT_RE = re.compile(r"(tcp|udp)/(\d{1,5})(?:-(\d{1,5}))?")
KINDS = ("report", "heartbeat")
VM_KEYS = frozenset({"vm", "uuid", "vm_uuid", "vm_id", "vm_name", "vmid", "vm-uuid", "vm-id"})
MAX_USERS = MAX_LABELS = MAX_APPS = 256
MAX_PORTS = MAX_CHECKS = 64
MAX_OS = 128
MAX_SEQ = 2**63 - 1


class Drop(Exception):
    """A message the relay refuses; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    seq: int
    kind: str
    sent_at: float
    context: dict[str, Any]  # only the fields the API takes, checked


def malformed(detail: str) -> Drop:
    return Drop("malformed", detail)


def parse(line: bytes) -> Message:
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise malformed(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise malformed("not a JSON object")
    context = raw.get("context")
    claimed = named_vm_keys(raw) | (named_vm_keys(context) if isinstance(context, dict) else set())
    if claimed:
        raise Drop("named_vm", f"guest tried to name a VM (keys {sorted(claimed)})")
    return Message(
        _seq(raw.get("seq")),
        _kind(raw.get("kind")),
        _sent_at(raw.get("sent_at")),
        check_context(context),
    )


def named_vm_keys(obj: dict[str, Any]) -> set[str]:
    return {k for k in obj if isinstance(k, str) and k.lower() in VM_KEYS}


def _seq(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise malformed(f"seq: expected an integer 0..2^63-1, got {value!r}")
    return value


def _kind(value: Any) -> str:
    if value not in KINDS:
        raise malformed(f"kind: expected one of {KINDS}, got {value!r}")
    return str(value)


def _sent_at(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= 1e11
    ):
        raise malformed(f"sent_at: expected epoch seconds, got {value!r}")
    return float(value)


def check_context(ctx: Any) -> dict[str, Any]:
    if not isinstance(ctx, dict):
        raise malformed("context: expected an object")
    out: dict[str, Any] = {
        "users": _names(ctx.get("users", []), "users", MAX_USERS),
        "apps": _apps(ctx.get("apps", {})),
        "labels": _names(ctx.get("labels", []), "labels", MAX_LABELS),
        "posture": _posture(ctx.get("posture", {})),
    }
    os_name = ctx.get("os")
    if os_name is not None:
        if not isinstance(os_name, str) or not 1 <= len(os_name) <= MAX_OS:
            raise malformed(f"context.os: expected a string of 1..{MAX_OS} characters")
        out["os"] = os_name
    return out


def _names(value: Any, where: str, limit: int) -> list[str]:
    if not isinstance(value, list) or len(value) > limit:
        raise malformed(f"context.{where}: expected a list of at most {limit} names")
    for item in value:
        if not isinstance(item, str) or not NAME_RE.fullmatch(item):
            raise malformed(f"context.{where}: not a valid name {item!r}")
    return sorted(set(value))


def _apps(value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or len(value) > MAX_APPS:
        raise malformed(f"context.apps: expected an object of at most {MAX_APPS} apps")
    out = {}
    for app, ports in value.items():
        if not NAME_RE.fullmatch(app):
            raise malformed(f"context.apps: not a valid app name {app!r}")
        if not isinstance(ports, list) or len(ports) > MAX_PORTS:
            raise malformed(f"context.apps.{app}: expected a list of at most {MAX_PORTS} ports")
        out[app] = sorted({_port(p, app) for p in ports})
    return dict(sorted(out.items()))


def _port(value: Any, app: str) -> str:
    found = PORT_RE.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        raise malformed(f"context.apps.{app}: not a tcp/udp port {value!r}")
    low = int(found.group(2))
    high = int(found.group(3) or low)
    if not 1 <= low <= high <= 65535:
        raise malformed(f"context.apps.{app}: port out of range {value!r}")
    return value


def _posture(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_CHECKS:
        raise malformed(f"context.posture: expected an object of at most {MAX_CHECKS} checks")
    for check, verdict in value.items():
        if not CHECK_RE.fullmatch(check) or verdict not in ("pass", "fail"):
            raise malformed(f"context.posture: bad check {check!r}: {verdict!r}")
    return dict(sorted(value.items()))


def api_body(context: dict[str, Any], sent_at: float, now: float, ttl: int) -> dict[str, Any]:
    """The POST body; observed_at is the guest's clock clamped to now (never in the future)."""
    return {**context, "observed_at": min(sent_at, now), "ttl_seconds": ttl}
