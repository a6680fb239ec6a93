"""Config files and channel addresses shared by the agent and the relay."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

VSOCK_HOST_CID = 2


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Channel:
    """Where a guest talks to its relay: a unix socket path or a vsock (cid, port)."""

    kind: str  # "unix" | "vsock"
    path: str = ""
    cid: int = 0
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"vsock:{self.cid}:{self.port}"


def parse_channel(text: str) -> Channel:
    """Parse "unix:/path/to.sock" or "vsock:CID:PORT"."""
    kind, _, rest = str(text).partition(":")
    if kind == "unix" and rest:
        return Channel("unix", path=rest)
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        if cid.isdigit() and port.isdigit():
            return Channel("vsock", cid=int(cid), port=int(port))
    raise ConfigError(f"channel {text!r}: expected unix:/path or vsock:CID:PORT")


def connect(channel: Channel, timeout: float) -> socket.socket:
    """A connected stream socket to `channel` (raises OSError when nobody listens)."""
    if channel.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = channel.path
    else:
        sock = socket.socket(vsock_family(), socket.SOCK_STREAM)
        address = (channel.cid, channel.port)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def vsock_family() -> int:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise OSError("AF_VSOCK is not available on this platform")
    return int(family)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def number(data: dict[str, Any], key: str, default: float, minimum: float = 0.0) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{key}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def string_list(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    return list(value)


def string_map(data: dict[str, Any], key: str) -> dict[str, str]:
    value = data.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{key}: expected a mapping of names to strings")
    return {str(k): v for k, v in value.items()}


def list_map(data: dict[str, Any], key: str) -> dict[str, list[str]]:
    value = data.get(key) or {}
    ok = isinstance(value, dict) and all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in value.values()
    )
    if not ok:
        raise ConfigError(f"{key}: expected a mapping of names to lists of strings")
    return {str(k): list(v) for k, v in value.items()}


def setup_logging(name: str, level: str = "INFO") -> logging.Logger:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s",
    )
    return logging.getLogger(name)
