"""POST a VM's guest context to the controller API (stdlib HTTP)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: the API could not be reached
    detail: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retry(self) -> bool:
        """Worth sending again later (API away or overloaded) rather than refused for good."""
        return self.status == 0 or self.status in RETRYABLE


def guest_url(api: str, vm: str) -> str:
    return f"{api.rstrip('/')}/api/v1/vms/{urllib.parse.quote(vm, safe='')}/context/guest"


def post_guest_context(
    api: str, token: str, vm: str, body: dict[str, Any], timeout: float
) -> Outcome:
    return _post(guest_url(api, vm), token, body, timeout, api)


def post_rejection(api: str, token: str, vm: str, body: dict[str, Any], timeout: float) -> Outcome:
    """Report refused guest messages for `vm` (reason, count, detail) to the controller's audit log."""
    return _post(guest_url(api, vm) + "/rejected", token, body, timeout, api)


def _post(url: str, token: str, body: dict[str, Any], timeout: float, api: str) -> Outcome:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", "application/json")
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return Outcome(resp.status, "ok")
    except urllib.error.HTTPError as exc:
        return Outcome(exc.code, _detail(exc.read()))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Outcome(0, f"cannot reach {api}: {reason}")


def _detail(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body)[:500]
    return str(body)[:500]
