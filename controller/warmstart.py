"""The first thing `goldilocks run` does: put stored flow snapshots (controller/flowsnap.py)
back onto emptied bridges while the rest of the controller is still importing and loading.

It dials each local bridge's OpenFlow management socket (`<bridge>.mgmt`, beside the OVSDB
socket of a hypervisor configured as `unix:PATH`) as ovn-controller and ovs-ofctl do, rather
than waiting for the bridge to call: a switch whose controller has been away reconnects only
when its backoff (up to max_backoff, 8 s by default) lets it, long after this start is over.
A bridge gets its snapshot only if `flowsnap.refusal` finds nothing against it (it must be
empty, among other things); either way the connection is closed at once, and the full
controller reconciles every bridge as on any start. Remote hypervisors (OVSDB over TCP or SSL)
are left to the full controller.

What a restore needs from the configuration file (the database, the bridges) is also kept in a
restore plan beside it, `<config>.restore`, written by each start that parsed the file. The next
`goldilocks run --config FILE` reads the plan, if it was written for FILE's exact bytes, before
it parses its command line: importing a YAML parser alone takes ~25 ms on a 2-core machine,
half of what a restore of 800 flows takes from process start. With no usable plan the start
parses the file and restores as before.

Standard library only, and of that only what is cheap to import (named tuples, not dataclasses;
no logging until the restores are under way): importing more would defeat the purpose. A test
holds `goldilocks run` to that.
"""

from __future__ import annotations

# The socket and hashlib modules cost a start ~10 ms each (enum conversions; OpenSSL's libcrypto),
# threading ~3 ms (functools, weakref sets): the C modules beneath them do what a restore needs.
import _socket
import _thread
import os
import time
from collections import namedtuple

try:
    from _sha256 import sha256  # hashlib's own fallback, the same digest as hashlib.sha256
except ImportError:  # CPython 3.12 renamed it
    from hashlib import sha256

from apps.restore import Outcome, restore_connection
from controller.flowsnap import StoredSnapshots, load_snapshots, refusal, sqlite_path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (apps/restore.py)
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Sequence

    from apps.restore import Choice, SwitchView
    from controller.config import Config

LOGGER = "goldilocks.restore"
TIMEOUT_S = 5.0  # per bridge; a stuck switch must not hold the controller's start for long
FIRST_WAIT_S = 1.0  # the start waits this long for its restores, then goes on beside them
PLAN_SUFFIX = ".restore"
PLAN_HEADER = "goldilocks restore plan 1"


class Bridge(namedtuple("Bridge", "hypervisor mgmt")):
    """A local bridge to restore: its hypervisor's name and its management socket's path."""

    __slots__ = ()
    hypervisor: str
    mgmt: str


class RestorePlan(namedtuple("RestorePlan", "digest database bridges")):
    """What restoring under one configuration file needs from it."""

    __slots__ = ()
    digest: str  # sha256 of the file's bytes: the plan is used only for exactly that file
    database: str  # the SQLite file holding the snapshots, as the file's URL names it
    bridges: tuple[Bridge, ...]


class Restores:
    """Restores running in the background, one thread per local bridge. They start before
    logging is set up, so each outcome is kept, with when it ended, until `report_to`."""

    def __init__(self, jobs: dict[str, Callable[[], Outcome]]) -> None:
        self._outcomes: dict[str, Outcome] = {}
        self._lock = _thread.allocate_lock()
        self._unreported: list[tuple[str, Outcome, float]] = []
        self._logger: logging.Logger | None = None
        self._jobs = sorted(jobs.items())
        # One per job, held until it ends: what `wait` waits on. The threads are bare _thread
        # ones, which (like daemon threads) do not hold up the interpreter's exit.
        self._running = [_thread.allocate_lock() for _ in self._jobs]

    def start(self) -> Restores:
        for (hypervisor, job), running in zip(self._jobs, self._running, strict=True):
            running.acquire()
            _thread.start_new_thread(self._run, (hypervisor, job, running))
        return self

    def wait(self, timeout: float = TIMEOUT_S + 1.0) -> dict[str, Outcome]:
        """Every outcome, once each restore has ended (or `timeout` has passed)."""
        deadline = time.monotonic() + timeout
        for running in self._running:
            if running.acquire(timeout=max(0.0, deadline - time.monotonic())):
                running.release()
        with self._lock:
            return dict(self._outcomes)

    def report_to(self, logger: logging.Logger) -> None:
        """Log the outcomes that have ended (stamped with when they did), and from now on each
        one as it ends."""
        with self._lock:
            self._logger = logger
            ended, self._unreported = self._unreported, []
        for hypervisor, outcome, at in ended:
            log_outcome(logger, hypervisor, outcome, at)

    def _run(self, hypervisor: str, job: Callable[[], Outcome], running: _thread.LockType) -> None:
        # Released only once the outcome is logged (or kept for report_to): whoever `wait`s
        # then finds it in the log, not just in the outcomes.
        try:
            outcome = job()
            at = time.time()
            with self._lock:
                self._outcomes[hypervisor] = outcome
                logger = self._logger
                if logger is None:
                    self._unreported.append((hypervisor, outcome, at))
            if logger is not None:
                log_outcome(logger, hypervisor, outcome, at)
        finally:
            running.release()


def log_outcome(logger: logging.Logger, hypervisor: str, outcome: Outcome, at: float) -> None:
    """One INFO record for `outcome`, stamped `at` (epoch) rather than when it is written."""
    import logging  # already loaded by whoever set the logger up

    if not logger.isEnabledFor(logging.INFO):
        return
    if outcome.installed:
        msg, args = "%s: restored %d flow mods from its snapshot", (hypervisor, outcome.installed)
    else:
        msg, args = "%s: flow snapshot not restored: %s", (hypervisor, outcome.reason)
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, msg, args, None)
    record.created, record.msecs = at, int((at - int(at)) * 1000) + 0.0
    logger.handle(record)


# ---- starting them --------------------------------------------------------------------------


def start_early(argv: Sequence[str]) -> Restores | None:
    """The restores of `goldilocks run --config FILE` (exactly that command line), started from
    FILE's restore plan before the command line is parsed. None for any other command line, or
    when the plan is missing, was written for other bytes, or cannot be trusted: `run` then
    restores after parsing FILE (start_restores)."""
    path = run_config(argv)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            digest = sha256(f.read()).hexdigest()
    except OSError:
        return None  # run reports it, after parsing the command line
    plan = load_plan(path, digest)
    return start_plan(plan) if plan is not None else None


def run_config(argv: Sequence[str]) -> str | None:
    """FILE of `run --config FILE` or `run --config=FILE`; None for anything else."""
    if len(argv) == 3 and argv[0] == "run" and argv[1] == "--config":
        return argv[2]
    if len(argv) == 2 and argv[0] == "run" and argv[1].startswith("--config="):
        return argv[1][len("--config="):] or None
    return None


def start_restores(config: Config) -> Restores | None:
    """Restores of every local bridge under a parsed `config`, started; None when there is
    nothing to restore."""
    plan = plan_of(config)
    return start_plan(plan) if plan is not None else None


def start_plan(plan: RestorePlan) -> Restores | None:
    """The restores of `plan`, started; None when its database does not exist yet. Each dials
    its switch and shakes hands while this thread reads the snapshots (~5 ms with the import
    of sqlite), then chooses once they are read."""
    if not os.path.exists(plan.database):
        return None
    loaded = Loaded()
    restores = Restores({b.hypervisor: _job(b.mgmt, loaded, plan.digest) for b in plan.bridges}).start()
    stored = StoredSnapshots(None, {})
    try:
        stored = load_snapshots(plan.database)
    finally:
        loaded.set(stored)  # whatever happened: a restore never waits out its timeout for it
    return restores


class Loaded:
    """The stored snapshots, handed from the thread that reads them to the restores."""

    def __init__(self) -> None:
        self._ready = _thread.allocate_lock()
        self._ready.acquire()
        self._stored: StoredSnapshots | None = None

    def set(self, stored: StoredSnapshots) -> None:
        self._stored = stored
        self._ready.release()

    def get(self, timeout: float) -> StoredSnapshots | None:
        """The snapshots, once read; None if that takes longer than `timeout`."""
        if not self._ready.acquire(timeout=timeout):
            return None
        self._ready.release()
        return self._stored


def _job(mgmt: str, loaded: Loaded, digest: str) -> Callable[[], Outcome]:
    return lambda: restore_bridge(mgmt, lambda view: choose_loaded(loaded, digest, view))


def choose_loaded(loaded: Loaded, digest: str, view: SwitchView) -> Choice:
    stored = loaded.get(TIMEOUT_S)
    if stored is None:
        return f"the stored snapshots were not read within {TIMEOUT_S:g} s"
    return choose_snapshot(stored, digest, view)


def plan_of(config: Config) -> RestorePlan | None:
    """What restoring under `config` needs; None when it restores nothing: restore is off, the
    database is not a SQLite file (snapshots are read with the standard library's sqlite3
    only), or no hypervisor's Open vSwitch is local."""
    database = sqlite_path(config.database_url)
    if not config.restore or database is None:
        return None
    bridges = tuple(Bridge(hv.name, mgmt) for hv in sorted(config.hypervisors.values(), key=lambda hv: hv.name)
                    if (mgmt := management_socket(hv.ovsdb, hv.bridge)) is not None)
    return RestorePlan(config.digest, database, bridges) if bridges else None


def management_socket(ovsdb: str, bridge: str) -> str | None:
    """Where a bridge of a local Open vSwitch listens for OpenFlow management connections: in
    its run directory, beside the OVSDB socket."""
    if not ovsdb.startswith("unix:"):
        return None
    return os.path.join(os.path.dirname(ovsdb[len("unix:"):]), f"{bridge}.mgmt")


def restore_bridge(mgmt: str, choose: Callable[[SwitchView], Choice]) -> Outcome:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    try:
        sock.connect(mgmt)
    except OSError as exc:
        sock.close()
        return Outcome(None, 0, f"cannot reach {mgmt}: {exc.strerror or exc}")
    return restore_connection(sock, choose, TIMEOUT_S)


def choose_snapshot(stored: StoredSnapshots, digest: str, view: SwitchView) -> Choice:
    snapshot = stored.by_dpid.get(view.dpid)
    reason = refusal(snapshot, version=view.version, ports=view.ports, flow_count=view.flow_count,
                     generation=stored.generation, digest=digest, now=time.time())
    if reason is not None:
        return reason
    assert snapshot is not None  # refusal names a missing one
    return snapshot.flow_mods


# ---- the restore plan file --------------------------------------------------------------------


def plan_path(config_path: str | os.PathLike[str]) -> str:
    return os.fspath(config_path) + PLAN_SUFFIX


def plan_text(plan: RestorePlan) -> str:
    """The plan file's text: tab-separated lines. ValueError if a value holds a tab or a newline."""
    rows = [("digest", plan.digest), ("database", plan.database),
            *(("bridge", b.hypervisor, b.mgmt) for b in plan.bridges)]
    if any("\t" in v or "\n" in v or "\r" in v for row in rows for v in row):
        raise ValueError("a path or name holds a tab or a line break")
    return "\n".join([PLAN_HEADER, *("\t".join(row) for row in rows)]) + "\n"


def parse_plan(text: str) -> RestorePlan | None:
    """The plan `plan_text` wrote; None for anything else."""
    lines = text.split("\n")
    if not lines or lines[0] != PLAN_HEADER or lines[-1] != "":
        return None
    digest, database, bridges = None, None, []
    for row in (line.split("\t") for line in lines[1:-1]):
        if row[0] == "digest" and len(row) == 2 and digest is None:
            digest = row[1]
        elif row[0] == "database" and len(row) == 2 and database is None:
            database = row[1]
        elif row[0] == "bridge" and len(row) == 3:
            bridges.append(Bridge(row[1], row[2]))
        else:
            return None
    if not digest or not database or not bridges:
        return None
    return RestorePlan(digest, database, tuple(bridges))


def load_plan(config_path: str | os.PathLike[str], digest: str) -> RestorePlan | None:
    """The plan beside `config_path` if it was written for a file of this `digest`, and no one
    could have written it who could not also have rewritten the configuration file (it names the
    database whose flows are installed): owned by us or by the file's owner, not group- or
    world-writable. None otherwise."""
    path = plan_path(config_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        owner = os.stat(config_path).st_uid
        if (st.st_mode & 0o170000) != 0o100000 or st.st_mode & 0o022 or st.st_uid not in (owner, os.geteuid()):
            return None
        text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    plan = parse_plan(text)
    return plan if plan is not None and plan.digest == digest else None


def store_plan(config_path: str | os.PathLike[str], plan: RestorePlan | None) -> str | None:
    """Write (or, given None, remove) the plan beside `config_path`, atomically and only readable
    by us; what went wrong, or None. A start that cannot write it restores after parsing."""
    path = plan_path(config_path)
    try:
        if plan is None:
            if os.path.lexists(path):
                os.unlink(path)
            return None
        text = plan_text(plan)
        if _holds(path, text):
            return None
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with open(fd, "wb") as f:
                f.write(text.encode("utf-8"))
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
    except (OSError, ValueError) as exc:
        return f"cannot write the restore plan {path}: {exc}"
    return None


def _holds(path: str, text: str) -> bool:
    """Whether the plan file at `path` is ours, private and says `text` already."""
    try:
        st = os.lstat(path)
        if (st.st_mode & 0o170777) != 0o100600 or st.st_uid != os.geteuid():
            return False
        with open(path, encoding="utf-8") as f:
            return f.read() == text
    except (OSError, UnicodeDecodeError):
        return False
