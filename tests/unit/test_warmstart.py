"""controller/warmstart.py's restore plan: what a restore needs from a configuration file, kept
beside it so the next `goldilocks run --config FILE` can restore before parsing FILE. Only a
plan written for FILE's exact bytes, by someone who could have written FILE, is used."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from apps.restore import Outcome, SwitchView
from controller.config import load_config
from controller.flowsnap import StoredSnapshots
from controller.warmstart import (
    PLAN_HEADER,
    Bridge,
    Loaded,
    RestorePlan,
    Restores,
    choose_loaded,
    load_plan,
    parse_plan,
    plan_of,
    plan_path,
    plan_text,
    restore_bridge,
    run_config,
    start_early,
    start_plan,
    store_plan,
)

CONFIG = ("database: sqlite:///{db}\napi: false\nhypervisors:\n"
          "  hv2: {{ovsdb: 'unix:/run/ovs2/db.sock', bridge: br-b}}\n"
          "  hv1: {{ovsdb: 'unix:/run/ovs1/db.sock', bridge: br-a}}\n"
          "  remote: {{ovsdb: 'tcp:10.0.0.9:6640', bridge: br-int}}\n")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "goldilocks.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "g.db"))
    return path


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_plan_names_the_database_and_each_local_bridges_management_socket(config_file: Path) -> None:
    config = load_config(config_file)
    plan = plan_of(config)
    assert plan == RestorePlan(digest_of(config_file), str(config_file.parent / "g.db"),
                               (Bridge("hv1", "/run/ovs1/br-a.mgmt"), Bridge("hv2", "/run/ovs2/br-b.mgmt")))
    assert config.digest == plan.digest  # the parsed file's digest and the early reader's agree


@pytest.mark.parametrize(("change", "why"), [
    ("openflow: {restore: false}\n", "restore is off"),
    ("database: postgresql+psycopg://u@h/db\n", "snapshots are read from SQLite only"),
])
def test_nothing_to_restore_means_no_plan(tmp_path: Path, change: str, why: str) -> None:
    path = tmp_path / "c.yaml"
    text = CONFIG.format(db=tmp_path / "g.db")
    path.write_text(text.replace(f"database: sqlite:///{tmp_path / 'g.db'}\n", "") + change
                    if change.startswith("database") else text + change)
    assert plan_of(load_config(path)) is None, why


def test_no_local_bridge_means_no_plan(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("hypervisors: {remote: {ovsdb: 'tcp:10.0.0.9:6640', bridge: br-int}}\n")
    assert plan_of(load_config(path)) is None


def test_a_stored_plan_is_read_back_for_the_same_bytes_only(config_file: Path) -> None:
    plan = plan_of(load_config(config_file))
    assert store_plan(config_file, plan) is None
    stored = Path(plan_path(config_file))
    assert stored.stat().st_mode & 0o777 == 0o600
    assert stored.read_text().splitlines()[0] == PLAN_HEADER
    assert load_plan(config_file, digest_of(config_file)) == plan
    config_file.write_text(config_file.read_text() + "# a comment changes the bytes\n")
    assert load_plan(config_file, digest_of(config_file)) is None


def test_a_plan_someone_else_could_have_written_is_not_used(config_file: Path) -> None:
    plan = plan_of(load_config(config_file))
    store_plan(config_file, plan)
    stored, digest = Path(plan_path(config_file)), digest_of(config_file)
    stored.chmod(0o620)  # group-writable
    assert load_plan(config_file, digest) is None
    stored.chmod(0o600)
    os.chown(stored, 4242, -1)  # neither us nor the configuration file's owner
    assert load_plan(config_file, digest) is None
    os.chown(config_file, 4242, -1)  # ...unless that uid owns the configuration file too
    assert load_plan(config_file, digest) == plan


def test_a_plan_that_is_a_symlink_is_not_followed(config_file: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(plan_text(plan_of(load_config(config_file))))  # type: ignore[arg-type]
    elsewhere.chmod(0o600)
    Path(plan_path(config_file)).symlink_to(elsewhere)
    assert load_plan(config_file, digest_of(config_file)) is None


def test_storing_rewrites_a_plan_that_is_not_private_and_removes_one_no_longer_wanted(config_file: Path) -> None:
    plan = plan_of(load_config(config_file))
    store_plan(config_file, plan)
    stored = Path(plan_path(config_file))
    stored.chmod(0o644)
    assert store_plan(config_file, plan) is None
    assert stored.stat().st_mode & 0o777 == 0o600
    assert store_plan(config_file, None) is None
    assert not stored.exists()
    assert store_plan(config_file, None) is None  # nothing to remove is fine


def test_a_plan_that_cannot_be_written_says_why(tmp_path: Path) -> None:
    plan = RestorePlan("d", "/var/lib/g.db", (Bridge("hv1", "/run/ovs/br\tint.mgmt"),))
    problem = store_plan(tmp_path / "c.yaml", plan)
    assert problem is not None and "tab" in problem and str(tmp_path / "c.yaml.restore") in problem
    assert store_plan(tmp_path / "missing-dir" / "c.yaml", plan_of_one()) is not None
    assert list(tmp_path.iterdir()) == []  # and nothing half-written is left


def plan_of_one() -> RestorePlan:
    return RestorePlan("d", "/var/lib/g.db", (Bridge("hv1", "/run/ovs/br-int.mgmt"),))


@pytest.mark.parametrize("text", [
    "", "not a plan\n", PLAN_HEADER + "\ndigest\td\ndatabase\t/g.db\n",  # no bridge
    PLAN_HEADER + "\ndigest\td\ndatabase\t/g.db\nbridge\thv1\t/m\n" + "digest\te\n",  # twice
    PLAN_HEADER + "\ndigest\td\ndatabase\t/g.db\nbridge\thv1\n",  # a bridge without its socket
    PLAN_HEADER + "\ndigest\td\ndatabase\t/g.db\nbridge\thv1\t/m",  # cut short: no final newline
    PLAN_HEADER + "\ndigest\td\ndatabase\t/g.db\nbridge\thv1\t/m\nport\t1\n",  # unknown row
])
def test_anything_but_a_whole_plan_reads_as_none(text: str) -> None:
    assert parse_plan(text) is None


def test_a_whole_plan_reads_back() -> None:
    assert parse_plan(plan_text(plan_of_one())) == plan_of_one()


@pytest.mark.parametrize(("argv", "path"), [
    (["run", "--config", "/etc/g.yaml"], "/etc/g.yaml"),
    (["run", "--config=/etc/g.yaml"], "/etc/g.yaml"),
    (["run", "--config="], None),
    (["run", "--config", "/etc/g.yaml", "--verbose"], None),
    (["run"], None),
    (["check", "--config", "/etc/g.yaml"], None),
    ([], None),
])
def test_only_run_with_its_config_restores_before_the_command_line_is_parsed(argv: list[str], path: str | None) -> None:
    assert run_config(argv) == path


def test_no_early_restore_without_a_plan_for_the_files_bytes(config_file: Path) -> None:
    assert start_early(["run", "--config", str(config_file)]) is None  # no plan yet
    store_plan(config_file, plan_of(load_config(config_file)))
    config_file.write_text(config_file.read_text() + "log_level: DEBUG\n")
    assert start_early(["run", "--config", str(config_file)]) is None  # the plan of other bytes
    assert start_early(["run", "--config", str(config_file.parent / "absent.yaml")]) is None


def test_a_bridge_that_cannot_be_reached_is_named(tmp_path: Path) -> None:
    outcome = restore_bridge(str(tmp_path / "br-int.mgmt"), lambda view: "unused")
    assert outcome.dpid is None and outcome.installed == 0
    assert outcome.reason.startswith(f"cannot reach {tmp_path / 'br-int.mgmt'}: ")


def test_outcomes_that_end_before_logging_is_set_up_are_logged_at_the_time_they_ended(
        caplog: pytest.LogCaptureFixture) -> None:
    before = time.time()
    restores = Restores({"hv1": lambda: Outcome(1, 806, ""), "hv2": lambda: Outcome(2, 0, "the bridge holds 3 flows")})
    assert restores.start().wait() == {"hv1": Outcome(1, 806, ""), "hv2": Outcome(2, 0, "the bridge holds 3 flows")}
    time.sleep(0.05)
    logger = logging.getLogger("goldilocks.restore.test")
    with caplog.at_level(logging.INFO, logger=logger.name):
        restores.report_to(logger)
    got = {r.getMessage(): r.created for r in caplog.records}
    assert set(got) == {"hv1: restored 806 flow mods from its snapshot",
                        "hv2: flow snapshot not restored: the bridge holds 3 flows"}
    assert all(before <= at < before + 0.05 for at in got.values()), got


def test_an_outcome_that_ends_after_logging_is_set_up_is_logged_as_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    a, b = socket.socketpair()  # hv1's restore ends when b is closed
    restores = Restores({"hv1": lambda: Outcome(None, 0, f"read {a.recv(1)!r}")}).start()
    logger = logging.getLogger("goldilocks.restore.test2")
    with caplog.at_level(logging.INFO, logger=logger.name):
        restores.report_to(logger)
        assert caplog.records == []
        b.close()
        restores.wait()
    a.close()
    assert [r.getMessage() for r in caplog.records] == ["hv1: flow snapshot not restored: read b''"]


def test_wait_returns_only_after_an_outcome_that_ended_after_report_to_is_logged() -> None:
    """CI once saw `wait` return while the restore thread was still writing its record."""
    written: list[str] = []

    class SlowHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(0.2)  # a slow log file: the record lands well after the outcome is kept
            written.append(record.getMessage())

    logger = logging.getLogger("goldilocks.restore.test3")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = SlowHandler()
    logger.addHandler(handler)
    try:
        a, b = socket.socketpair()
        restores = Restores({"hv1": lambda: Outcome(None, 0, f"read {a.recv(1)!r}")}).start()
        restores.report_to(logger)
        b.close()
        restores.wait()
        assert written == ["hv1: flow snapshot not restored: read b''"]
        a.close()
    finally:
        logger.removeHandler(handler)


def test_a_restore_chooses_only_once_the_snapshots_are_read() -> None:
    # The restores shake hands while the starting thread reads the snapshots (start_plan).
    loaded, chosen = Loaded(), []
    view = SwitchView(1, 5, frozenset(), 0)
    chooser = threading.Thread(target=lambda: chosen.append(choose_loaded(loaded, "digest", view)))
    chooser.start()
    time.sleep(0.05)
    assert chosen == []
    loaded.set(StoredSnapshots(None, {}))
    chooser.join(timeout=2)
    assert chosen == ["no flow snapshot for this bridge"]


def test_snapshots_never_read_are_waited_for_no_longer_than_asked() -> None:
    assert Loaded().get(timeout=0.01) is None


def test_no_restore_starts_before_the_database_exists(tmp_path: Path) -> None:
    plan = RestorePlan("digest", str(tmp_path / "absent.db"), (Bridge("hv1", str(tmp_path / "br-int.mgmt")),))
    assert start_plan(plan) is None


def test_a_restore_started_beside_the_read_reports_what_stopped_it(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "g.db").close()  # a database without snapshot tables
    plan = RestorePlan("digest", str(tmp_path / "g.db"), (Bridge("hv1", str(tmp_path / "br-int.mgmt")),))
    restores = start_plan(plan)
    assert restores is not None
    outcome = restores.wait(timeout=2)["hv1"]
    assert outcome.installed == 0 and outcome.reason.startswith(f"cannot reach {tmp_path / 'br-int.mgmt'}: ")
