"""A small client for the Goldilocks REST API, for the CLI (stdlib only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_API = "http://127.0.0.1:8080"


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {describe(body)}")


def describe(body: Any) -> str:
    """The API's error body as lines a person can read."""
    if isinstance(body, dict):
        if body.get("problems"):
            return "\n".join(f"  {p.get('location')}: {p.get('message')}" for p in body["problems"])
        if "message" in body:
            return str(body["message"])
        detail = body.get("detail")
        if isinstance(detail, list):
            return "\n".join(f"  {'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
        if detail is not None:
            return str(detail)
    return str(body)


@dataclass(frozen=True)
class Client:
    base: str
    token: str | None

    @staticmethod
    def from_env(base: str | None, token: str | None) -> "Client":
        return Client((base or os.environ.get("GOLDILOCKS_API") or DEFAULT_API).rstrip("/"),
                      token or os.environ.get("GOLDILOCKS_TOKEN"))

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/api/v1{path}", data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode(errors="replace")
            raise ApiError(exc.code, payload) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, f"cannot reach {self.base}: {exc.reason}") from None
        return json.loads(raw) if raw else None
