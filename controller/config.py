"""The `goldilocks run` configuration file (YAML), validated with every problem located.

    scenario: examples/three-tier.yaml    # seeds an empty database on first start (relative to this file)
    database: sqlite:////var/lib/goldilocks/goldilocks.db   # default: goldilocks.db next to this file
    api: {listen: 127.0.0.1, port: 8080}  # REST API; `api: false` for none
    openflow:
      listen: 127.0.0.1                   # default: loopback only
      port: 6653
      tls: {key: ctl.key, cert: ctl.crt, ca: switch-ca.crt}   # optional: ssl: listener, switch certs verified
      restore: true                       # put flow snapshots back on emptied bridges at start (docs/running.md)
    hypervisors:
      hv1: {ovsdb: "unix:/var/run/openvswitch/db.sock", bridge: br-int, uplinks: [uplink0], set_fail_secure: true}
    apps: []                              # extra os-ken apps to load, as ryu-manager would
    log_level: INFO
    quarantine:                           # optional; these are the defaults (docs/quarantine.md)
      on_edr: true                        # an EDR verdict (posture.edr=fail) quarantines
      on_posture_fail: false              # a failing guest posture check quarantines
      posture_checks: []                  # ...only these checks; [] = any
      on_agent_silent: false              # guest context past its TTL quarantines
      remediation_group: remediation      # stays reachable from quarantined VMs; null = none

See docs/running.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from controller.policy.quarantine import QuarantinePolicy
from controller.problems import Problem

OVSDB_SCHEMES = ("unix:", "tcp:", "ssl:")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Tls:
    key: Path
    cert: Path
    ca: Path


@dataclass(frozen=True)
class HypervisorConfig:
    name: str
    ovsdb: str
    bridge: str
    uplinks: tuple[str, ...] = ()
    set_fail_secure: bool = False
    ovsdb_tls: Tls | None = None  # for ssl: remotes


@dataclass(frozen=True)
class Config:
    path: Path
    scenario: Path | None  # seeds an empty database on first start
    listen: str = "127.0.0.1"
    port: int = 6653
    tls: Tls | None = None
    hypervisors: Mapping[str, HypervisorConfig] = field(default_factory=dict)
    apps: tuple[str, ...] = ()
    log_level: str = "INFO"
    database: str = ""  # SQLAlchemy URL; "" = sqlite file goldilocks.db next to the config
    api_listen: str = "127.0.0.1"
    api_port: int | None = 8080  # None: no REST API
    quarantine: QuarantinePolicy = field(default_factory=QuarantinePolicy)
    restore: bool = True  # put flow snapshots back while starting (controller/warmstart.py)
    digest: str = ""  # sha256 of the file as read: a flow snapshot holds the one it was taken under

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.path.parent.resolve() / 'goldilocks.db'}"


class ConfigError(ValueError):
    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def _unknown(data: Mapping[str, Any], allowed: tuple[str, ...], where: str, out: list[Problem]) -> None:
    for key in data:
        if key not in allowed:
            out.append(Problem(f"{where}.{key}" if where else str(key), f"unknown key (expected one of {', '.join(allowed)})"))


def _tls(data: Any, base: Path, where: str, out: list[Problem]) -> Tls | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        out.append(Problem(where, "must be a mapping with key, cert and ca"))
        return None
    _unknown(data, ("key", "cert", "ca"), where, out)
    paths = {}
    for k in ("key", "cert", "ca"):
        v = data.get(k)
        if not isinstance(v, str):
            out.append(Problem(f"{where}.{k}", "required: a file path"))
            continue
        p = (base / v).resolve()
        if not p.is_file():
            out.append(Problem(f"{where}.{k}", f"no such file: {p}"))
        paths[k] = p
    return Tls(paths["key"], paths["cert"], paths["ca"]) if len(paths) == 3 else None


def parse_config(data: Any, path: Path) -> Config:
    out: list[Problem] = []
    base = path.parent
    if not isinstance(data, dict):
        raise ConfigError(str(path), [Problem("(top)", "the config must be a YAML mapping")])
    _unknown(data, ("scenario", "database", "api", "openflow", "hypervisors", "apps", "log_level", "quarantine"), "", out)
    scenario = data.get("scenario")
    scenario_path: Path | None = None
    if scenario is not None and not isinstance(scenario, str):
        out.append(Problem("scenario", "must be the path of a scenario file"))
    elif isinstance(scenario, str):
        scenario_path = (base / scenario).resolve()
        if not scenario_path.is_file():
            out.append(Problem("scenario", f"no such file: {scenario_path}"))
    database = data.get("database", "")
    if not isinstance(database, str) or (database and "://" not in database):
        out.append(Problem("database", f"{database!r} is not a database URL (sqlite:///PATH or postgresql+psycopg://...)"))
        database = ""
    api_listen, api_port = _api(data.get("api", {}), out)
    of = data.get("openflow") or {}
    listen, port, tls, restore = "127.0.0.1", 6653, None, True
    if not isinstance(of, dict):
        out.append(Problem("openflow", "must be a mapping"))
    else:
        _unknown(of, ("listen", "port", "tls", "restore"), "openflow", out)
        restore = of.get("restore", restore)
        if not isinstance(restore, bool):
            out.append(Problem("openflow.restore", f"{restore!r}: must be true or false"))
        listen = of.get("listen", listen)
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            out.append(Problem("openflow.listen", f"{listen!r} is not an IP address"))
        port = of.get("port", port)
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            out.append(Problem("openflow.port", f"{port!r} is not a port number (1-65535)"))
        tls = _tls(of.get("tls"), base, "openflow.tls", out)
    hypervisors = _hypervisors(data.get("hypervisors"), base, out)
    apps = data.get("apps") or []
    if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
        out.append(Problem("apps", "must be a list of os-ken app module names"))
        apps = []
    level = str(data.get("log_level", "INFO")).upper()
    if level not in LOG_LEVELS:
        out.append(Problem("log_level", f"{level!r} (expected one of {', '.join(LOG_LEVELS)})"))
    quarantine = _quarantine(data.get("quarantine"), out)
    if out:
        raise ConfigError(str(path), out)
    return Config(path, scenario_path, listen, port, tls, hypervisors, tuple(apps), level, database, api_listen, api_port,
                  quarantine=quarantine, restore=restore is True)


def _quarantine(data: Any, out: list[Problem]) -> QuarantinePolicy:
    default = QuarantinePolicy()
    if data is None:
        return default
    if not isinstance(data, dict):
        out.append(Problem("quarantine", "must be a mapping (on_edr, on_posture_fail, posture_checks, "
                                         "on_agent_silent, remediation_group)"))
        return default
    _unknown(data, ("on_edr", "on_posture_fail", "posture_checks", "on_agent_silent", "remediation_group"),
             "quarantine", out)
    flags: dict[str, bool] = {}
    for key in ("on_edr", "on_posture_fail", "on_agent_silent"):
        value = data.get(key, getattr(default, key))
        if not isinstance(value, bool):
            out.append(Problem(f"quarantine.{key}", f"{value!r}: must be true or false"))
            value = getattr(default, key)
        flags[key] = value
    checks = data.get("posture_checks", [])
    if checks is None:
        checks = []
    if not isinstance(checks, list):
        out.append(Problem("quarantine.posture_checks", "must be a list of posture check names ([] = any)"))
        checks = []
    for i, check in enumerate(checks):
        if not isinstance(check, str) or not check.strip():
            out.append(Problem(f"quarantine.posture_checks[{i}]", f"{check!r} is not a posture check name"))
    group = data.get("remediation_group", default.remediation_group)
    if group is not None and (not isinstance(group, str) or not group.strip()):
        out.append(Problem("quarantine.remediation_group", f"{group!r}: must be a group name, or null for none"))
        group = default.remediation_group
    return QuarantinePolicy(
        on_edr=flags["on_edr"], on_posture_fail=flags["on_posture_fail"],
        posture_checks=tuple(c for c in checks if isinstance(c, str) and c.strip()),
        on_agent_silent=flags["on_agent_silent"], remediation_group=group,
    )


def _api(data: Any, out: list[Problem]) -> tuple[str, int | None]:
    if data is False:
        return "127.0.0.1", None
    if not isinstance(data, dict):
        out.append(Problem("api", "must be a mapping with listen and port, or false for no API"))
        return "127.0.0.1", None
    _unknown(data, ("listen", "port"), "api", out)
    listen, port = data.get("listen", "127.0.0.1"), data.get("port", 8080)
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        out.append(Problem("api.listen", f"{listen!r} is not an IP address"))
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        out.append(Problem("api.port", f"{port!r} is not a port number (1-65535)"))
    return str(listen), port if isinstance(port, int) else None


def _hypervisors(data: Any, base: Path, out: list[Problem]) -> dict[str, HypervisorConfig]:
    result: dict[str, HypervisorConfig] = {}
    if not isinstance(data, dict) or not data:
        out.append(Problem("hypervisors", "required: a mapping of hypervisor name -> {ovsdb, bridge}"))
        return result
    for name, hv in data.items():
        where = f"hypervisors.{name}"
        if not isinstance(hv, dict):
            out.append(Problem(where, "must be a mapping with ovsdb and bridge"))
            continue
        _unknown(hv, ("ovsdb", "bridge", "uplinks", "set_fail_secure", "tls"), where, out)
        remote, bridge = hv.get("ovsdb"), hv.get("bridge")
        if not isinstance(remote, str) or not remote.startswith(OVSDB_SCHEMES):
            out.append(Problem(f"{where}.ovsdb", f"{remote!r}: use unix:PATH, tcp:IP:PORT or ssl:IP:PORT"))
        if not isinstance(bridge, str) or not bridge:
            out.append(Problem(f"{where}.bridge", "required: the bridge name"))
        uplinks = hv.get("uplinks", [])
        if not isinstance(uplinks, list) or not all(isinstance(u, str) for u in uplinks):
            out.append(Problem(f"{where}.uplinks", "must be a list of port names"))
            uplinks = []
        secure = hv.get("set_fail_secure", False)
        if not isinstance(secure, bool):
            out.append(Problem(f"{where}.set_fail_secure", "must be true or false"))
        tls = _tls(hv.get("tls"), base, f"{where}.tls", out)
        if isinstance(remote, str) and remote.startswith("ssl:") and tls is None:
            out.append(Problem(f"{where}.tls", "an ssl: OVSDB remote needs tls: {key, cert, ca}"))
        if isinstance(remote, str) and isinstance(bridge, str):
            result[str(name)] = HypervisorConfig(str(name), remote, bridge, tuple(uplinks), bool(secure), tls)
    return result


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
        data = yaml.safe_load(raw.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [Problem(str(p), f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    except OSError as exc:
        raise ConfigError(str(p), [Problem(str(p), f"cannot read: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(str(p), [Problem(where, f"YAML syntax error: {getattr(exc, 'problem', exc)}")]) from None
    return replace(parse_config(data, p), digest=hashlib.sha256(raw).hexdigest())
