"""Living context end to end on real OVS: the controller (`goldilocks run`), one relay per
hypervisor (`python -m agent.relay`, inside the sandbox's network namespace so it reaches the
API on 127.0.0.1) and one guest agent per VM (`python -m agent.guest`, inside the VM's network
namespace, with its own utmp file and unix channel). Logins are real utmp records written by
the test; traffic is real TCP and ICMP between the VM namespaces through the bridges.

`Living` is also what bench/context.py measures with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import utmp
from controller.boot import policy_document_of
from tests.ovs import test_controller as _controller_tests
from tests.ovs.harness import (
    EstablishedConnection,
    ping,
    tcp_connect,
    tcp_server,
)
from tests.ovs.test_controller import ADMIN_TOKEN, EXAMPLE, ROOT, Lab, vm_ip, wait_for

lab = _controller_tests.lab  # the Lab fixture: a private OVS, two bridges, the VMs plugged

TTL = 4  # seconds: the relay's ttl_seconds, so silence is noticed quickly
INTERVAL = 0.2  # agent observation interval
HEARTBEAT = 1.0
# Who is logged in at the start, as the scenario says (fin-desk2's bob is no finance user).
INITIAL_USERS = {"fin-desk1": ["alice"], "fin-desk2": ["bob"], "eng-desk1": ["carol"], "ledger-db": []}
APPS = {"ledger-db": {"postgres": ["postgres"]}}

# ---- a tiny HTTP client run inside the sandbox namespace (the API listens on its 127.0.0.1)

_HTTP = """
import json, sys, urllib.request, urllib.error
method, url, token, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        status, raw = r.status, r.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
except (urllib.error.URLError, OSError) as e:  # not listening yet
    status, raw = 0, json.dumps(str(e)).encode()
try:
    payload = json.loads(raw or b"null")
except ValueError:
    payload = raw.decode(errors="replace")
print(json.dumps({"status": status, "body": payload}))
"""


def api(lab: Lab, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> tuple[int, Any]:
    """One API call as a client on the controller's host would make it: (status, JSON body)."""
    proc = subprocess.run(["ip", "netns", "exec", lab.ovs.netns, sys.executable, "-c", _HTTP, method,
                           f"http://127.0.0.1:{lab.api_port}/api/v1{path}", token,
                           "" if body is None else json.dumps(body)],
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{method} {path}: client failed: {proc.stderr}")
    out = json.loads(proc.stdout)
    return out["status"], out["body"]


# ---- utmp -------------------------------------------------------------------------------


def write_users(path: Path, users: list[str], dead: list[str] = ()) -> None:  # type: ignore[assignment]
    """The VM's utmp: a USER_PROCESS record per logged-in user, DEAD_PROCESS for logged-out ones."""
    now = int(time.time())
    entries = [utmp.Entry(utmp.BOOT_TIME, line="~", user="reboot", tv_sec=now - 600)]
    for i, user in enumerate(users):
        entries.append(utmp.Entry(utmp.USER_PROCESS, pid=1000 + i, line=f"pts/{i}", id=f"ts/{i}"[-4:],
                                  user=user, host="10.9.9.9", session=1000 + i, tv_sec=now))
    for i, user in enumerate(dead, start=len(users)):
        entries.append(utmp.Entry(utmp.DEAD_PROCESS, pid=1000 + i, line=f"pts/{i}", id=f"ts/{i}"[-4:],
                                  user=user, session=1000 + i, tv_sec=now))
    utmp.write_entries(path, entries)


# ---- processes ----------------------------------------------------------------------------


class Living:
    """The relays and agents around a started Lab; `stop()` ends every process it started."""

    def __init__(self, lab: Lab, ttl: int = TTL, interval: float = INTERVAL, heartbeat: float = HEARTBEAT) -> None:
        self.lab, self.ttl, self.interval, self.heartbeat = lab, ttl, interval, heartbeat
        self.dir = lab.tmp / "living"
        self.dir.mkdir(exist_ok=True)
        self.tokens: dict[str, str] = {}
        self.relays: dict[str, subprocess.Popen[bytes]] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.hv_of = {vm.name: vm.hypervisor for vm in lab.scenario.inventory.vms.values()}

    # paths
    def utmp(self, vm: str) -> Path:
        return self.dir / f"{vm}.utmp"

    def socket(self, vm: str) -> str:
        return str(self.dir / f"{vm}.sock")

    def status_file(self, hv: str) -> Path:
        return self.dir / f"relay-{hv}.status.json"

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # setup
    def start(self, users: dict[str, list[str]] | None = None) -> Living:
        lab = self.lab
        wait_for("the API", lambda: api(lab, "GET", "/health")[0] == 200, timeout=30, every=0.3)
        for hv in lab.bridges:
            status, body = api(lab, "POST", "/tokens", {"name": f"relay-{hv}", "role": "relay", "hypervisor": hv})
            assert status == 201, body
            self.tokens[hv] = body["token"]
            (self.dir / f"relay-{hv}.token").write_text(body["token"])
        for vm, who in (users or INITIAL_USERS).items():
            write_users(self.utmp(vm), who)
        for hv in lab.bridges:
            self.start_relay(hv)
        for hv in lab.bridges:
            wait_for(f"relay {hv} listening", lambda hv=hv: all(
                os.path.exists(self.socket(vm)) for vm, h in self.hv_of.items() if h == hv), timeout=20)
        for vm in self.hv_of:
            self.start_agent(vm)
        # Every VM's guest context now comes from its agent, through its hypervisor's relay.
        for vm, hv in self.hv_of.items():
            wait_for(f"{vm}'s agent heard at the controller", lambda vm=vm, hv=hv: self.guest_record(vm) is not None
                     and self.guest_record(vm).get("reported_by") == f"relay-{hv}", timeout=30, every=0.3)
        return self

    def start_relay(self, hv: str) -> None:
        config = {
            "hypervisor": hv, "api": f"http://127.0.0.1:{self.lab.api_port}",
            "token_file": str(self.dir / f"relay-{hv}.token"),
            "vms": {vm: f"unix:{self.socket(vm)}" for vm, h in self.hv_of.items() if h == hv},
            "ttl_seconds": self.ttl, "rate": {"per_second": 20, "burst": 40},
            "status_file": str(self.status_file(hv)), "status_interval": 0.1,
            "min_forward_interval": 1, "api_timeout": 5, "log_level": "INFO",
        }
        path = self.dir / f"relay-{hv}.yaml"
        path.write_text(yaml.safe_dump(config))
        with open(self.dir / f"relay-{hv}.log", "ab") as out:
            self.relays[hv] = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ovs.netns, sys.executable, "-m", "agent.relay", "--config", str(path)],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)

    def agent_config(self, vm: str) -> dict[str, Any]:
        return {"channel": f"unix:{self.socket(vm)}", "interval": self.interval, "heartbeat": self.heartbeat,
                "utmp": str(self.utmp(vm)), "apps": APPS.get(vm, {}), "log_level": "INFO"}

    def start_agent(self, vm: str) -> None:
        path = self.dir / f"agent-{vm}.yaml"
        path.write_text(yaml.safe_dump(self.agent_config(vm)))
        with open(self.dir / f"agent-{vm}.log", "ab") as out:
            self.agents[vm] = self.lab.ovs.vms[vm].popen(
                [sys.executable, "-m", "agent.guest", "--config", str(path)],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for proc in [*self.agents.values(), *self.relays.values()]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.agents.values(), *self.relays.values()]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    # observations
    def guest_record(self, vm: str) -> dict[str, Any] | None:
        status, body = api(self.lab, "GET", f"/vms/{vm}/context")
        assert status == 200, body
        records = body.get("records", body) if isinstance(body, dict) else body
        for r in records if isinstance(records, list) else []:
            if r.get("provenance") == "guest":
                return r
        return None

    def relay_status(self, hv: str) -> dict[str, Any]:
        try:
            return json.loads(self.status_file(hv).read_text())
        except (OSError, ValueError):
            return {}

    def counter(self, vm: str, name: str) -> int:
        return int(self.relay_status(self.hv_of[vm]).get("vms", {}).get(vm, {}).get(name, 0))


@pytest.fixture
def living(lab: Lab) -> Iterator[Living]:
    lab.start()
    lab.converged()
    world = Living(lab)
    try:
        yield world.start()
    finally:
        world.stop()


# ---- helpers ----------------------------------------------------------------------------


def eventually(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    wait_for(what, check, timeout=timeout, every=0.1)


def explain(lab: Lab, src: str, dst: str, proto: str, port: int = 0) -> dict[str, Any]:
    out = lab.cli("explain", "--src", src, "--dst", dst, "--proto", proto, "--port", str(port), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    return {**data, "allowed": data["verdict"] == "allow"}


def explained(lab: Lab, src: str, dst: str, proto: str, port: int = 0) -> str:
    """`goldilocks explain` as an operator reads it: verdict, deciding rule, memberships and their facts."""
    out = lab.cli("explain", "--src", src, "--dst", dst, "--proto", proto, "--port", str(port))
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---- the cases -----------------------------------------------------------------------------


def test_a_login_grants_and_its_logout_cuts_the_established_connection(living: Living) -> None:
    lab = living.lab
    desk, ledger = lab.ovs.vms["fin-desk2"], lab.ovs.vms["ledger-db"]
    ledger_ip = vm_ip(lab, "ledger-db")
    assert explain(lab, "fin-desk2", "ledger-db", "tcp", 5432)["allowed"] is False  # bob is no finance user
    with tcp_server(ledger, 5432):
        assert not tcp_connect(desk, ledger_ip, 5432, timeout=1.0)
        write_users(living.utmp("fin-desk2"), ["bob", "alice"])  # alice logs in on fin-desk2
        eventually("alice's login to open fin-desk2 -> ledger-db tcp/5432",
                   lambda: tcp_connect(desk, ledger_ip, 5432, timeout=0.5))
        assert explain(lab, "fin-desk2", "ledger-db", "tcp", 5432)["allowed"] is True
        with EstablishedConnection(desk, ledger_ip, 5432) as conn:
            assert conn.alive()
            write_users(living.utmp("fin-desk2"), ["bob"], dead=["alice"])  # her session ends
            eventually("the established connection to be cut after alice's logout",
                       lambda: not conn.alive(timeout=0.5))
        assert not tcp_connect(desk, ledger_ip, 5432, timeout=1.0), "a new connection succeeded after the logout"
        assert explain(lab, "fin-desk2", "ledger-db", "tcp", 5432)["allowed"] is False
    assert ping(desk, ledger_ip), "platform-based access (desktops may ping the ledger) was lost"
    assert living.guest_record("fin-desk2")["facts"], "fin-desk2's agent is still heard"


def test_an_app_rule_follows_the_port_the_app_listens_on(living: Living) -> None:
    lab = living.lab
    document = policy_document_of(EXAMPLE)
    document["rules"].append({"id": "desktops-to-ledger-postgres", "tier": "application", "position": 30,
                              "source": {"group": "desktops"}, "destination": {"group": "ledger"},
                              "services": ["app:postgres"], "action": "allow"})
    draft = lab.tmp / "app-rule.yaml"
    draft.write_text(yaml.safe_dump(document))
    applied = lab.cli("policy", "apply", str(draft), "--comment", "desktops reach postgres wherever it listens")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    published = lab.cli("policy", "publish")
    assert published.returncode == 0, published.stdout + published.stderr

    desk, ledger = lab.ovs.vms["eng-desk1"], lab.ovs.vms["ledger-db"]  # carol: no finance grant
    ledger_ip = vm_ip(lab, "ledger-db")
    # Any process on 6543 is not postgres: nothing allows it.
    with tcp_server(ledger, 6543):
        time.sleep(3 * INTERVAL)  # the agent would have reported it, were it allowlisted
        assert not tcp_connect(desk, ledger_ip, 6543, timeout=1.0), "a non-postgres listener was reachable"
    # postgres starts on the new port 6543: the app rule follows it.
    with tcp_server(ledger, 6543, comm="postgres"):
        eventually("the app rule to open tcp/6543 where postgres listens",
                   lambda: tcp_connect(desk, ledger_ip, 6543, timeout=0.5))
        assert explain(lab, "eng-desk1", "ledger-db", "tcp", 6543)["allowed"] is True
        assert not tcp_connect(desk, ledger_ip, 5432, timeout=1.0), "the app rule opened a port postgres is not on"
    # postgres stops: tcp/6543 closes again, even to another process listening there.
    with tcp_server(ledger, 6543):
        eventually("the app rule to close tcp/6543 after postgres stopped",
                   lambda: not tcp_connect(desk, ledger_ip, 6543, timeout=0.5)
                   and explain(lab, "eng-desk1", "ledger-db", "tcp", 6543)["allowed"] is False)
    assert ping(desk, ledger_ip)


def test_a_killed_agent_loses_its_guest_grants_after_the_ttl_and_keeps_platform_ones(living: Living) -> None:
    lab = living.lab
    desk, ledger = lab.ovs.vms["fin-desk1"], lab.ovs.vms["ledger-db"]
    ledger_ip = vm_ip(lab, "ledger-db")
    with tcp_server(ledger, 5432):
        eventually("fin-desk1 (alice, finance) reaching the ledger", lambda: tcp_connect(desk, ledger_ip, 5432, timeout=0.5))
        with EstablishedConnection(desk, ledger_ip, 5432) as conn:
            assert conn.alive()
            living.agents["fin-desk1"].send_signal(signal.SIGKILL)
            living.agents["fin-desk1"].wait(timeout=10)
            killed_at = time.monotonic()
            eventually("fin-desk1's guest context to expire and its established connection to be cut",
                       lambda: not conn.alive(timeout=0.5), timeout=TTL + 20)
            cut_after = time.monotonic() - killed_at
        assert not tcp_connect(desk, ledger_ip, 5432, timeout=1.0), "a new connection succeeded after the TTL"
    record = living.guest_record("fin-desk1")
    assert record is not None and record["expired"] is True, record
    assert explain(lab, "fin-desk1", "ledger-db", "tcp", 5432)["allowed"] is False
    assert ping(desk, ledger_ip), "platform-based access (desktops may ping the ledger) was lost"
    # The other VMs' agents still speak: their context is live.
    assert living.guest_record("fin-desk2")["expired"] is False
    print(f"established connection cut {cut_after:.1f} s after SIGKILL (ttl {TTL} s)")


def _raw_client(path: str, lines: list[dict[str, Any]]) -> None:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        for line in lines:
            sock.sendall(json.dumps(line).encode() + b"\n")
        time.sleep(0.3)  # let the relay read before we close


def test_impersonation_replay_and_a_foreign_relay_are_rejected_and_change_nothing(living: Living) -> None:
    lab = living.lab
    probes = [("fin-desk2", "ledger-db", "tcp", 5432), ("eng-desk1", "ledger-db", "tcp", 5432),
              ("fin-desk1", "ledger-db", "tcp", 5432), ("fin-desk2", "ledger-db", "icmp", 0)]
    before = {p: explained(lab, *p) for p in probes}
    assert ": DENY" in before[probes[0]] and ": ALLOW" in before[probes[2]], before
    finance = {"users": ["alice"], "apps": {}, "labels": [], "posture": {}}

    # 1. fin-desk2's guest claims to be fin-desk1 (alice logged in there): dropped at the relay.
    named0 = living.counter("fin-desk2", "named_vm")
    _raw_client(living.socket("fin-desk2"), [
        {"seq": time.time_ns(), "kind": "report", "sent_at": time.time(), "vm": "fin-desk1", "context": finance},
        {"seq": time.time_ns() + 1, "kind": "report", "sent_at": time.time(), "context": {**finance, "vm_uuid": "x"}},
    ])
    eventually("the relay to count the self-naming messages", lambda: living.counter("fin-desk2", "named_vm") >= named0 + 2)
    assert "guest tried to name a VM" in living.log("relay-hv1")

    # 2. A replayed report: an old sequence number on fin-desk2's channel.
    replayed0 = living.counter("fin-desk2", "replayed")
    last = living.counter("fin-desk2", "last_seq")
    assert last > 0
    _raw_client(living.socket("fin-desk2"), [
        {"seq": last - 5, "kind": "report", "sent_at": time.time(), "context": finance},
        {"seq": 1, "kind": "report", "sent_at": time.time(), "context": finance},
    ])
    eventually("the relay to count the replays", lambda: living.counter("fin-desk2", "replayed") >= replayed0 + 2)

    # 3. The hv1 relay speaks for ledger-db, which is on hv2: 403 at the controller, audited.
    status, body = api(lab, "POST", "/vms/ledger-db/context/guest",
                       {"users": ["alice"], "apps": {"postgres": ["tcp/1-65535"]}, "ttl_seconds": 600},
                       token=living.tokens["hv1"])
    assert status == 403, (status, body)
    assert "relay for hv1 may not report context for VM ledger-db on hv2" in json.dumps(body), body
    audit = lab.cli("audit", "--limit", "200")
    assert audit.returncode == 0, audit.stderr
    rejected = [l for l in audit.stdout.splitlines() if "relay-hv1" in l and "context.guest" in l and "rejected" in l]
    assert rejected, audit.stdout

    # What the relay refused reaches the controller's audit log too.
    def relay_reported() -> bool:
        out = lab.cli("audit", "--limit", "200").stdout
        return "rejected: named_vm at the relay" in out and "rejected: replayed at the relay" in out

    eventually("the relay's refusals in the controller's audit log", relay_reported)

    # Nothing changed: the controller still has fin-desk2 as bob's, ledger-db as its own agent says.
    time.sleep(2 * HEARTBEAT)
    desk2 = living.guest_record("fin-desk2")
    users2 = sorted(f["value"] for f in desk2["facts"] if f.get("attr") == "user")
    assert users2 == ["bob"], desk2
    ledger = living.guest_record("ledger-db")
    assert ledger["reported_by"] == "relay-hv2" and not any(f.get("attr") == "user" for f in ledger["facts"]), ledger
    assert {p: explained(lab, *p) for p in probes} == before
    with tcp_server(lab.ovs.vms["ledger-db"], 5432):
        assert not tcp_connect(lab.ovs.vms["fin-desk2"], vm_ip(lab, "ledger-db"), 5432, timeout=1.0)


def test_quarantine_by_edr_verdict_isolates_but_for_remediation_and_release_restores(living: Living) -> None:
    lab = living.lab
    # The remediation group (docs/quarantine.md): eng-desk1 plays the remediation server.
    document = policy_document_of(EXAMPLE)
    document["groups"]["remediation"] = "name == 'eng-desk1'"
    draft = lab.tmp / "remediation.yaml"
    draft.write_text(yaml.safe_dump(document))
    for step in (("policy", "apply", str(draft)), ("policy", "publish")):
        done = lab.cli(*step)
        assert done.returncode == 0, done.stdout + done.stderr
    desk, ledger, fixer = lab.ovs.vms["fin-desk1"], lab.ovs.vms["ledger-db"], lab.ovs.vms["eng-desk1"]
    ledger_ip, desk_ip = vm_ip(lab, "ledger-db"), vm_ip(lab, "fin-desk1")
    with tcp_server(ledger, 5432), tcp_server(desk, 22):
        eventually("fin-desk1 (alice) reaching the ledger", lambda: tcp_connect(desk, ledger_ip, 5432, timeout=0.5))
        assert ping(desk, ledger_ip)
        with EstablishedConnection(desk, ledger_ip, 5432) as conn:
            assert conn.alive()
            status, body = api(lab, "POST", "/vms/fin-desk1/context/authoritative", {"verdict": "malicious"})
            assert status == 200, body
            eventually("the EDR verdict to quarantine fin-desk1", lambda: any(
                q["vm"] == "fin-desk1" and "edr verdict" in q["reasons"] for q in api(lab, "GET", "/quarantine")[1]))
            eventually("fin-desk1's established connection to be cut", lambda: not conn.alive(timeout=0.5))
        assert not tcp_connect(desk, ledger_ip, 5432, timeout=1.0), "a quarantined VM opened a connection"
        assert not ping(desk, ledger_ip), "a quarantined VM kept its platform grants"
        assert not tcp_connect(lab.ovs.vms["fin-desk2"], desk_ip, 22, timeout=1.0)
        assert tcp_connect(fixer, desk_ip, 22, timeout=2.0), "the remediation group cannot reach the quarantined VM"
        quarantined = explain(lab, "fin-desk1", "ledger-db", "tcp", 5432)
        assert quarantined["verdict"] == "deny" and "quarantined" in quarantined["reason"], quarantined

        # A clean verdict alone does not release: an operator does.
        assert api(lab, "POST", "/vms/fin-desk1/context/authoritative", {"verdict": "clean"})[0] == 200
        assert not ping(desk, ledger_ip)
        assert any(q["vm"] == "fin-desk1" for q in api(lab, "GET", "/quarantine")[1])
        status, body = api(lab, "POST", "/vms/fin-desk1/release")
        assert status == 200, body
        eventually("the release to restore fin-desk1's access",
                   lambda: tcp_connect(desk, ledger_ip, 5432, timeout=0.5) and ping(desk, ledger_ip))
        assert not any(q["vm"] == "fin-desk1" for q in api(lab, "GET", "/quarantine")[1])
    audit = lab.cli("audit", "--limit", "200").stdout
    assert "vm.release" in audit, audit
