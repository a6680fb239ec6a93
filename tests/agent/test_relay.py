"""Agent -> relay -> API, all real: a relay process, agent processes, a recording HTTP server."""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agent.support import (
    DEAD_PROCESS,
    USER_PROCESS,
    Api,
    Proc,
    msg,
    read_status,
    send_lines,
    utmp_record,
    wait_for,
    write_utmp,
)

TOKEN = "relay-secret-hv1"
VM_A = str(uuid.uuid4())
VM_B = str(uuid.uuid4())


@dataclass
class Stack:
    api: Api
    workdir: Path
    relay: Proc
    status_path: Path

    def sock(self, vm: str) -> str:
        return f"{self.workdir}/vm-{vm[:8]}.sock"

    def start_relay(self) -> None:
        self.status_path.unlink(missing_ok=True)
        self.relay.start()
        wait_for("relay up", lambda: self.status_path.exists() and os.path.exists(self.sock(VM_A)))

    def status(self, vm: str) -> dict[str, Any]:
        return read_status(self.status_path).get("vms", {}).get(vm, {})

    def agent(self, vm: str, name: str, **overrides: Any) -> Proc:
        utmp = self.workdir / f"utmp-{name}"
        if not utmp.exists():
            write_utmp(utmp, [])
        config = {
            "channel": f"unix:{self.sock(vm)}",
            "interval": 0.1,
            "heartbeat": 0.5,
            "utmp": str(utmp),
            "os_release": str(self.workdir / "os-release"),
            "labels": ["pci"],
            "groups": {"alice": ["finance"]},
            **overrides,
        }
        return Proc("agent.guest", config, self.workdir, name)


@pytest.fixture
def stack(api: Api, workdir: Path) -> Iterator[Stack]:
    (workdir / "relay.token").write_text(TOKEN + "\n")
    (workdir / "os-release").write_text("PRETTY_NAME=SimOS\n")
    status = workdir / "status.json"
    config = {
        "hypervisor": "hv1",
        "api": api.url,
        "token_file": str(workdir / "relay.token"),
        "vms": {
            VM_A: f"unix:{workdir}/vm-{VM_A[:8]}.sock",
            VM_B: f"unix:{workdir}/vm-{VM_B[:8]}.sock",
        },
        "ttl_seconds": 15,
        "rate": {"per_second": 5, "burst": 10},
        "status_file": str(status),
        "status_interval": 0.1,
        "min_forward_interval": 1.0,
    }
    env = {"GOLDILOCKS_RELAY_TOKEN": ""}  # the token file, not the environment, in these tests
    s = Stack(api, workdir, Proc("agent.relay", config, workdir, "relay", env=env), status)
    s.start_relay()
    yield s
    s.relay.kill()


def posts_where(api: Api, vm: str, test: Any) -> list[Any]:
    return [p for p in api.for_vm(vm) if test(p.body)]


def test_login_and_logout_reach_the_api(stack: Stack) -> None:
    agent = stack.agent(VM_A, "a").start()
    first = wait_for("first POST", lambda: stack.api.for_vm(VM_A))[0]
    assert first.authorization == f"Bearer {TOKEN}"
    assert (
        first.body["users"] == []
        and first.body["os"] == "SimOS"
        and first.body["labels"] == ["pci"]
    )
    assert first.body["ttl_seconds"] == 15 and first.body["observed_at"] <= first.at
    assert set(first.body) <= {
        "users",
        "apps",
        "os",
        "labels",
        "posture",
        "observed_at",
        "ttl_seconds",
    }

    write_utmp(stack.workdir / "utmp-a", [utmp_record(USER_PROCESS, "alice")])
    t0 = time.time()
    login = wait_for(
        "POST with alice",
        lambda: posts_where(stack.api, VM_A, lambda b: b["users"] == ["alice"]),
        timeout=5,
    )[0]
    assert login.at - t0 < 3
    write_utmp(stack.workdir / "utmp-a", [utmp_record(DEAD_PROCESS, "alice")])
    wait_for(
        "POST without alice", lambda: stack.api.for_vm(VM_A)[-1].body["users"] == [], timeout=5
    )
    assert stack.api.for_vm(VM_B) == []
    assert agent.terminate() == 0
    wait_for("counters", lambda: stack.status(VM_A).get("accepted", 0) >= 3)


def test_heartbeats_refresh_until_the_agent_dies(stack: Stack) -> None:
    agent = stack.agent(VM_A, "a").start()
    wait_for("first POST", lambda: stack.api.for_vm(VM_A))
    time.sleep(3)
    refreshes = stack.api.for_vm(VM_A)
    assert len(refreshes) >= 3  # unchanged context still refreshes the TTL...
    gaps = [b.at - a.at for a, b in itertools.pairwise(refreshes)]
    assert min(gaps) > 0.8  # ...at most once a second
    agent.kill()
    time.sleep(1.2)
    count = len(stack.api.for_vm(VM_A))
    time.sleep(3)
    assert len(stack.api.for_vm(VM_A)) == count  # silence: the controller's TTL takes over


def test_relay_restart_agent_reconnects_and_resends(stack: Stack) -> None:
    write_utmp(stack.workdir / "utmp-a", [utmp_record(USER_PROCESS, "carol")])
    agent = stack.agent(VM_A, "a", heartbeat=30).start()  # no heartbeat will hide a missing resend
    wait_for("first POST", lambda: stack.api.for_vm(VM_A))
    assert stack.relay.terminate() == 0
    assert not os.path.exists(stack.sock(VM_A)) and not os.path.exists(stack.sock(VM_B))
    time.sleep(1)
    assert agent.alive
    restarted = time.time()
    stack.start_relay()
    resent = wait_for(
        "resend to the new relay",
        lambda: [p for p in stack.api.for_vm(VM_A) if p.at > restarted],
        timeout=10,
    )[0]
    assert resent.body["users"] == ["carol"]
    assert agent.alive and agent.terminate() == 0


def test_a_misbehaving_guest_gets_nothing_forwarded(stack: Stack) -> None:
    ctx = {"users": ["mallory"], "apps": {}, "os": "x", "posture": {}}
    seq = 1000
    send_lines(stack.sock(VM_A), [msg(seq, {**ctx, "labels": ["good"]})])
    wait_for("the good message", lambda: stack.api.for_vm(VM_A))
    lines = [
        msg(seq, {**ctx, "labels": ["replayed"]}),
        msg(seq - 1, {**ctx, "labels": ["older"]}),
        msg(seq + 1, {**ctx, "labels": ["named"]}, vm=VM_B),
        msg(seq + 2, {**ctx, "labels": ["named2"], "uuid": VM_B}),
        b"this is {not json",
    ]
    burst = [msg(seq + 10 + i, {**ctx, "labels": [f"burst-{i}"]}) for i in range(30)]
    send_lines(stack.sock(VM_A), lines + burst)
    counts = wait_for(
        "counters",
        lambda: (
            (s := stack.status(VM_A))
            and s["rate_limited"]
            and s["malformed"]
            and not s["pending"]
            and s
        ),
    )
    assert counts["replayed"] == 2 and counts["named_vm"] == 2 and counts["malformed"] == 1
    assert counts["rate_limited"] >= 15
    assert counts["accepted"] == 1 + 30 - counts["rate_limited"]
    time.sleep(1.5)  # let anything that would wrongly be forwarded arrive
    labels = {label for p in stack.api.all() for label in p.body["labels"]}
    assert not labels & {"replayed", "older", "named", "named2"}
    assert not {f"burst-{i}" for i in range(15, 30)} & labels
    assert stack.api.for_vm(VM_B) == []
    assert stack.relay.alive
    assert "guest tried to name a VM" in stack.relay.log()


def test_whatever_it_claims_a_message_on_a_socket_is_about_that_vm(stack: Stack) -> None:
    claim = {
        "users": ["eve"],
        "hostname": "vm-b",
        "hypervisor": "hv2",
        "name": VM_B,
        "labels": ["claims"],
    }
    send_lines(stack.sock(VM_A), [msg(1, claim, sender=VM_B, host=VM_B)])
    post = wait_for("POST", lambda: stack.api.all())[0]
    assert post.path == f"/api/v1/vms/{VM_A}/context/guest"
    assert post.body["users"] == ["eve"]
    assert not {"hostname", "hypervisor", "name", "sender", "host"} & set(post.body)
    time.sleep(0.5)
    assert stack.api.for_vm(VM_B) == []


def test_a_guest_clock_in_the_future_does_not_extend_the_ttl(stack: Stack) -> None:
    future = json.dumps(
        {"seq": 5, "kind": "report", "sent_at": time.time() + 3600, "context": {"users": ["alice"]}}
    ).encode()
    send_lines(stack.sock(VM_A), [future])
    post = wait_for("POST", lambda: stack.api.for_vm(VM_A))[0]
    assert post.body["observed_at"] <= post.at


def test_api_down_then_back(stack: Stack) -> None:
    stack.api.set_status(503)
    agent = stack.agent(VM_A, "a", heartbeat=30).start()
    wait_for("forward errors", lambda: stack.status(VM_A).get("forward_errors", 0) >= 2)
    assert "503" in stack.status(VM_A)["last_error"]
    write_utmp(stack.workdir / "utmp-a", [utmp_record(USER_PROCESS, "alice")])  # changes meanwhile
    time.sleep(0.5)
    assert stack.relay.alive and stack.api.for_vm(VM_A) == []
    stack.api.set_status(200)
    post = wait_for(
        "the latest context once the API is back", lambda: stack.api.for_vm(VM_A), timeout=10
    )[0]
    assert post.body["users"] == ["alice"]
    assert agent.terminate() == 0


def test_one_vm_does_not_block_another(stack: Stack) -> None:
    a = stack.agent(VM_A, "a").start()
    b = stack.agent(VM_B, "b").start()
    write_utmp(stack.workdir / "utmp-b", [utmp_record(USER_PROCESS, "bob")])
    # A floods its own channel; B's login still goes through promptly.
    flood = [msg(10**18 + i, {"users": [], "labels": [f"f{i}"]}) for i in range(200)]
    send_lines(stack.sock(VM_A), flood)
    wait_for(
        "B's login",
        lambda: posts_where(stack.api, VM_B, lambda body: body["users"] == ["bob"]),
        timeout=5,
    )
    assert a.terminate() == 0 and b.terminate() == 0


def test_token_from_the_environment_and_bad_configs(api: Api, workdir: Path) -> None:
    config = {
        "hypervisor": "hv1",
        "api": api.url,
        "vms": {VM_A: f"unix:{workdir}/a.sock"},
        "status_file": str(workdir / "st.json"),
        "status_interval": 0.1,
    }
    relay = Proc(
        "agent.relay", config, workdir, "relay-env", env={"GOLDILOCKS_RELAY_TOKEN": "from-env"}
    ).start()
    try:
        wait_for("relay up", lambda: (workdir / "st.json").exists())
        send_lines(f"{workdir}/a.sock", [msg(1, {"users": []})])
        assert wait_for("POST", lambda: api.for_vm(VM_A))[0].authorization == "Bearer from-env"
    finally:
        assert relay.terminate() == 0
    no_token = Proc(
        "agent.relay", config, workdir, "relay-none", env={"GOLDILOCKS_RELAY_TOKEN": ""}
    ).start()
    assert no_token.popen is not None and no_token.popen.wait(10) == 2
    assert "no relay token" in no_token.log()
