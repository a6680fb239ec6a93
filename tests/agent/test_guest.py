"""The agent as a real process talking to a real unix socket: reports, heartbeats, reconnects."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.support import (
    DEAD_PROCESS,
    USER_PROCESS,
    LineServer,
    Proc,
    utmp_record,
    wait_for,
    write_utmp,
)


@pytest.fixture
def agent_config(workdir: Path) -> dict[str, Any]:
    (workdir / "os-release").write_text('PRETTY_NAME="Guest OS 1"\n')
    write_utmp(workdir / "utmp", [])
    return {
        "channel": f"unix:{workdir}/vm.sock",
        "interval": 0.1,
        "heartbeat": 0.5,
        "utmp": str(workdir / "utmp"),
        "os_release": str(workdir / "os-release"),
        "labels": ["pci"],
        "posture": {"always": "true", "never": "false"},
        "posture_interval": 0,
    }


@pytest.fixture
def agent(agent_config: dict[str, Any], workdir: Path) -> Iterator[Proc]:
    proc = Proc("agent.guest", agent_config, workdir, "agent")
    yield proc
    proc.kill()


def test_report_then_heartbeats_then_a_login(agent: Proc, workdir: Path) -> None:
    server = LineServer(f"{workdir}/vm.sock")
    started_us = time.time_ns() // 1000
    agent.start()
    first = wait_for("first report", lambda: server.messages())[0]
    assert first["kind"] == "report" and first["seq"] > started_us
    assert first["context"] == {
        "users": [],
        "apps": {},
        "os": "Guest OS 1",
        "labels": ["pci"],
        "posture": {"always": "pass", "never": "fail"},
    }
    assert not {"vm", "uuid"} & set(first)  # the agent never names its VM
    beats = wait_for(
        "two heartbeats", lambda: [m for m in server.messages() if m["kind"] == "heartbeat"][1:]
    )
    assert beats[0]["context"] == first["context"]

    write_utmp(workdir / "utmp", [utmp_record(USER_PROCESS, "alice")])
    login = wait_for(
        "login report", lambda: [m for m in server.messages() if m["context"]["users"] == ["alice"]]
    )
    assert login[0]["kind"] == "report"
    write_utmp(workdir / "utmp", [utmp_record(DEAD_PROCESS, "alice")])
    wait_for("logout report", lambda: server.messages()[-1]["context"]["users"] == [])

    seqs = [m["seq"] for m in server.messages()]
    assert seqs == sorted(set(seqs))  # strictly increasing
    assert agent.terminate() == 0
    server.close()


def test_survives_the_relay_being_away_and_resends_on_reconnect(agent: Proc, workdir: Path) -> None:
    agent.start()
    time.sleep(1.5)  # nobody listening: it must keep trying, not die
    assert agent.alive
    server = LineServer(f"{workdir}/vm.sock")
    first = wait_for("report after the relay appears", lambda: server.messages())[0]
    assert first["kind"] == "report"
    server.close()  # the relay dies (broken pipe on the agent's next write)
    time.sleep(1.5)
    assert agent.alive
    write_utmp(workdir / "utmp", [utmp_record(USER_PROCESS, "bob")])  # changes while nobody listens
    again = LineServer(f"{workdir}/vm.sock")
    resent = wait_for("resend after reconnect", lambda: again.messages())[0]
    assert resent["kind"] == "report" and resent["seq"] > first["seq"]
    assert resent["context"]["users"] == ["bob"]
    assert agent.terminate() == 0
    again.close()


def test_seq_keeps_increasing_across_restarts(agent: Proc, workdir: Path) -> None:
    server = LineServer(f"{workdir}/vm.sock")
    agent.start()
    wait_for("a message", lambda: server.messages())
    assert agent.terminate() == 0
    before = server.messages()
    agent.start()
    after = wait_for("a message from the new agent", lambda: server.messages()[len(before) :])
    assert min(m["seq"] for m in after) > max(m["seq"] for m in before)
    assert agent.terminate() == 0
    server.close()


def test_bad_config_exits_2(workdir: Path) -> None:
    proc = Proc("agent.guest", {"interval": 1}, workdir, "bad").start()
    assert proc.popen is not None and proc.popen.wait(10) == 2
    assert "channel: required" in proc.log()
