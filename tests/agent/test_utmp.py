"""utmp parsing against real files written with struct (glibc x86_64 layout)."""

from __future__ import annotations

from pathlib import Path

from agent import utmp
from tests.agent.support import (
    DEAD_PROCESS,
    LOGIN_PROCESS,
    USER_PROCESS,
    UTMP,
    utmp_record,
    write_utmp,
)


def test_record_size_is_glibc_x86_64() -> None:
    assert UTMP.size == utmp.RECORD.size == 384


def test_user_process_entries_count_and_others_do_not(tmp_path: Path) -> None:
    path = tmp_path / "utmp"
    write_utmp(
        path,
        [
            utmp_record(USER_PROCESS, "alice", "pts/0"),
            utmp_record(USER_PROCESS, "bob", "pts/1"),
            utmp_record(DEAD_PROCESS, "carol", "pts/2"),
            utmp_record(LOGIN_PROCESS, "LOGIN", "tty1"),
            utmp_record(USER_PROCESS, "alice", "pts/3"),  # a second session: still one user
        ],
    )
    assert utmp.logged_in_users(path) == ["alice", "bob"]


def test_logout_turns_the_entry_dead(tmp_path: Path) -> None:
    path = tmp_path / "utmp"
    write_utmp(
        path, [utmp_record(USER_PROCESS, "alice"), utmp_record(USER_PROCESS, "bob", "pts/1")]
    )
    assert utmp.logged_in_users(path) == ["alice", "bob"]
    write_utmp(
        path, [utmp_record(DEAD_PROCESS, "alice"), utmp_record(USER_PROCESS, "bob", "pts/1")]
    )
    assert utmp.logged_in_users(path) == ["bob"]


def test_fields_are_decoded(tmp_path: Path) -> None:
    path = tmp_path / "utmp"
    write_utmp(path, [utmp_record(USER_PROCESS, "alice", "pts/7", pid=31337)])
    (entry,) = utmp.read_entries(path)
    assert (entry.type, entry.pid, entry.line, entry.user, entry.host) == (
        USER_PROCESS,
        31337,
        "pts/7",
        "alice",
        "10.0.0.9",
    )


def test_missing_file_and_torn_tail(tmp_path: Path) -> None:
    assert utmp.logged_in_users(tmp_path / "nope") == []
    path = tmp_path / "utmp"
    path.write_bytes(utmp_record(USER_PROCESS, "alice") + utmp_record(USER_PROCESS, "bob")[:100])
    assert utmp.logged_in_users(path) == ["alice"]


def test_writer_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "utmp"
    entries = [
        utmp.Entry(utmp.USER_PROCESS, 10, "pts/0", "ts/0", "dave", "host", 10, 1700000000, 5),
        utmp.Entry(utmp.DEAD_PROCESS, 11, "pts/1", "ts/1", "erin"),
    ]
    utmp.write_entries(path, entries)
    assert path.stat().st_size == 2 * 384
    assert utmp.read_entries(path) == entries
    assert utmp.logged_in_users(path) == ["dave"]
