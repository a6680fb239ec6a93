"""What the agent observes besides users and ports: OS, labels, groups, posture checks."""

from __future__ import annotations

import time
from pathlib import Path

from agent.observe import Observer, parse_os_release, read_os, run_check
from tests.agent.support import USER_PROCESS, utmp_record, write_utmp


def test_os_release(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_text(
        'NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
    )
    assert read_os(str(path)) == "Debian GNU/Linux 12 (bookworm)"
    path.write_text("ID=alpine\n# comment\n")
    assert read_os(str(path)) == "alpine"
    assert read_os(str(tmp_path / "none")) is None
    assert parse_os_release("A='x y'\nB=plain\n") == {"A": "x y", "B": "plain"}


def test_posture_checks() -> None:
    assert run_check("true", 5) == "pass"
    assert run_check("exit 3", 5) == "fail"
    assert run_check("/no/such/command", 5) == "fail"
    started = time.monotonic()
    assert run_check("sleep 30", 0.3) == "fail"
    assert time.monotonic() - started < 5


def test_collect(tmp_path: Path) -> None:
    utmp = tmp_path / "utmp"
    write_utmp(utmp, [utmp_record(USER_PROCESS, "alice"), utmp_record(USER_PROCESS, "bad user")])
    osr = tmp_path / "os-release"
    osr.write_text("PRETTY_NAME=TestOS\n")
    observer = Observer(
        utmp_path=str(utmp),
        groups={"alice": ["finance"], "bob": ["hr"]},
        os_release=str(osr),
        labels=["pci", "pci"],
        posture={"ok": "true", "bad": "false"},
        posture_interval=0,
    )
    assert observer.collect() == {
        "users": ["alice"],  # "bad user" is no name the controller would take
        "groups": {"alice": ["finance"]},  # only users logged in
        "apps": {},
        "os": "TestOS",
        "labels": ["pci"],
        "posture": {"bad": "fail", "ok": "pass"},
    }


def test_no_groups_key_without_a_groups_map(tmp_path: Path) -> None:
    context = Observer(
        utmp_path=str(tmp_path / "none"), os_release=str(tmp_path / "none")
    ).collect()
    assert "groups" not in context and context["users"] == [] and context["os"] is None


def test_posture_results_are_cached(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    observer = Observer(
        utmp_path=str(tmp_path / "u"), posture={"f": f"test -e {flag}"}, posture_interval=60
    )
    assert observer.collect()["posture"] == {"f": "fail"}
    flag.touch()
    assert observer.collect()["posture"] == {"f": "fail"}  # not re-run within the interval
    observer.posture_interval = 0
    assert observer.collect()["posture"] == {"f": "pass"}
