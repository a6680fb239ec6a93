"""glibc utmp files (x86_64 `struct utmp`, 384 bytes a record), read and written with struct.

Layout: ut_type int16 + 2 pad, ut_pid int32, ut_line 32s, ut_id 4s, ut_user 32s,
ut_host 256s, ut_exit 2 x int16, ut_session int32, ut_tv (sec int32, usec int32),
ut_addr_v6 16s, unused 20s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

RECORD = struct.Struct("<h2xi32s4s32s256shhiii16s20s")
assert RECORD.size == 384

EMPTY, RUN_LVL, BOOT_TIME, NEW_TIME, OLD_TIME = 0, 1, 2, 3, 4
INIT_PROCESS, LOGIN_PROCESS, USER_PROCESS, DEAD_PROCESS, ACCOUNTING = 5, 6, 7, 8, 9


@dataclass(frozen=True)
class Entry:
    type: int
    pid: int = 0
    line: str = ""
    id: str = ""
    user: str = ""
    host: str = ""
    session: int = 0
    tv_sec: int = 0
    tv_usec: int = 0


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def unpack(raw: bytes) -> Entry:
    (ut_type, pid, line, ut_id, user, host, _term, _exit, session, sec, usec, _addr, _unused) = (
        RECORD.unpack(raw)
    )
    return Entry(
        ut_type, pid, _text(line), _text(ut_id), _text(user), _text(host), session, sec, usec
    )


def pack(e: Entry) -> bytes:
    return RECORD.pack(
        e.type,
        e.pid,
        e.line.encode(),
        e.id.encode(),
        e.user.encode(),
        e.host.encode(),
        0,
        0,
        e.session,
        e.tv_sec,
        e.tv_usec,
        b"",
        b"",
    )


def read_entries(path: str | Path) -> list[Entry]:
    """Every whole record in the file ([] when it does not exist); a torn tail is ignored."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    whole = len(data) - len(data) % RECORD.size
    return [unpack(data[i : i + RECORD.size]) for i in range(0, whole, RECORD.size)]


def logged_in_users(path: str | Path) -> list[str]:
    """Sorted distinct user names of USER_PROCESS records."""
    return sorted({e.user for e in read_entries(path) if e.type == USER_PROCESS and e.user})


def write_entries(path: str | Path, entries: list[Entry]) -> None:
    """Replace the file with `entries` (atomically), as a simulated VM's login would."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(b"".join(pack(e) for e in entries))
    tmp.replace(target)
