"""Watch one hypervisor bridge in OVSDB with the python-ovs IDL (the shell around inventory.py).

One daemon thread per monitor owns the IDL: python-ovs is not thread-safe, so nothing else
touches it. The thread copies the few columns it needs into plain dicts, lets
`topology.inventory.from_rows` build an `ObservedBridge`, and calls ``on_change`` only when
that snapshot differs from the last one it delivered — so reconnects (which reload the whole
database) and changes to other bridges stay silent.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from topology import ovsjson
from topology.inventory import SECURE, ObservedBridge, bridge_problems, from_rows
from topology.ovslib import ovs  # python-ovs without eventlet, with a fast JSON parser

DEFAULT_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
DATABASE = "Open_vSwitch"
# Only these columns are replicated: the IDL then ignores statistics and status churn.
COLUMNS: dict[str, list[str]] = {
    "Bridge": ["name", "datapath_id", "fail_mode", "datapath_type", "ports"],
    "Port": ["name", "interfaces"],
    "Interface": ["name", "ofport", "external_ids"],
}
POLL_MSEC = 1000  # upper bound on one wait, even if the wake pipe were missed
RETRY_MIN_S, RETRY_MAX_S = 0.5, 8.0  # backoff when the IDL itself cannot be built or crashes
SCHEMA_FETCH_MSEC = 5000

OnChange = Callable[[ObservedBridge], None]


class OvsdbMonitor:
    """Delivers an `ObservedBridge` for ``bridge`` on every change that alters it."""

    def __init__(
        self,
        hypervisor: str,
        remote: str,
        bridge: str,
        on_change: OnChange,
        *,
        uplinks: Collection[str] = (),
        set_fail_secure: bool = False,
        ssl: tuple[str, str, str] | None = None,
        schema_path: str | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.remote = remote
        self.bridge = bridge
        self.uplinks = frozenset(uplinks)
        self.set_fail_secure = set_fail_secure
        self._on_change = on_change
        self._ssl = ssl
        self._schema_path = schema_path
        self._log = log or logging.getLogger(f"goldilocks.topology.ovsdb.{hypervisor}")
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._connected = False
        self._last: ObservedBridge | None = None
        self._logged_problems: frozenset[str] = frozenset()
        self._missing_logged = False
        self._txn: ovs.db.idl.Transaction | None = None

    # ---- public

    @property
    def connected(self) -> bool:
        """True while the IDL holds a live, fully synced connection."""
        return self._connected

    @property
    def last_snapshot(self) -> ObservedBridge | None:
        return self._last

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("OvsdbMonitor already started")
        if self._ssl is not None:
            _configure_ssl(*self._ssl)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)  # drained after every wake-up, never waited on
        self._thread = threading.Thread(target=self._run, name=f"ovsdb-{self.hypervisor}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        _poke(self._wake_w)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log.error("OVSDB monitor for %s did not stop within %.1fs",
                            self.hypervisor, timeout)
            return  # leave the pipe open: the thread still polls it
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._thread = None

    # ---- the thread

    def _run(self) -> None:
        delay = RETRY_MIN_S
        while not self._stop.is_set():
            try:
                self._watch(ovs.db.idl.Idl(self.remote, self._schema_helper()))
                return
            except Exception:  # noqa: BLE001 - a bug or a schema we cannot read must not end monitoring
                self._connected = False
                self._log.exception("OVSDB monitor for %s (%s) failed; retrying in %.1fs",
                                    self.hypervisor, self.remote, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _schema_helper(self) -> ovs.db.idl.SchemaHelper:
        if self._schema_path is not None or DEFAULT_SCHEMA.is_file():
            schema = ovsjson.from_file(self._schema_path or str(DEFAULT_SCHEMA))
            helper = ovs.db.idl.SchemaHelper(schema_json=schema)
        else:  # no OVS package on the controller host: ask the server for its schema
            helper = ovs.db.idl.SchemaHelper(schema_json=fetch_schema(self.remote))
        for table, columns in COLUMNS.items():
            helper.register_columns(table, columns)
        return helper

    def _watch(self, idl: ovs.db.idl.Idl) -> None:
        """Run the IDL until stop(); the IDL's session reconnects with backoff by itself."""
        seen_seqno = -1
        try:
            while not self._stop.is_set():
                idl.run()
                self._commit_pending()
                self._connected = _is_connected(idl)
                if idl.change_seqno != seen_seqno and idl.has_ever_connected():
                    seen_seqno = idl.change_seqno
                    self._changed(idl)
                self._block(idl)
        finally:
            self._connected = False
            idl.close()

    def _block(self, idl: ovs.db.idl.Idl) -> None:
        poller = ovs.poller.Poller()
        idl.wait(poller)
        if self._txn is not None:
            self._txn.wait(poller)
        poller.fd_wait(self._wake_r, select.POLLIN)
        poller.timer_wait(POLL_MSEC)
        poller.block()
        _drain(self._wake_r)

    # ---- snapshots

    def _changed(self, idl: ovs.db.idl.Idl) -> None:
        row = _bridge_row(idl, self.bridge)
        if row is None:
            if not self._missing_logged:
                self._log.warning("bridge %s not found in OVSDB of %s (%s); waiting for it",
                                  self.bridge, self.hypervisor, self.remote)
                self._missing_logged = True
            return
        self._missing_logged = False
        snapshot = _snapshot(self.hypervisor, self.bridge, row, self.uplinks)
        if snapshot == self._last:
            return  # a reconnect reload, or a change to rows of no interest
        self._last = snapshot
        self._report_problems(snapshot)
        if self.set_fail_secure and snapshot.fail_mode != SECURE:
            self._make_secure(idl, row)
        try:
            self._on_change(snapshot)
        except Exception:  # noqa: BLE001 - the consumer's bug must not stop monitoring
            self._log.exception("on_change callback failed for %s", self.hypervisor)

    def _report_problems(self, snapshot: ObservedBridge) -> None:
        """Log each problem when it appears (not on every poll), and say when it clears."""
        problems = frozenset(bridge_problems(snapshot))
        for text in sorted(problems - self._logged_problems):
            self._log.warning("%s", text)
        for text in sorted(self._logged_problems - problems):
            self._log.info("resolved: %s", text)
        self._logged_problems = problems

    # ---- fail_mode=secure

    def _make_secure(self, idl: ovs.db.idl.Idl, row: ovs.db.idl.Row) -> None:
        if self._txn is not None:
            return  # one attempt in flight; a later change retries if it fails
        self._log.warning("SETTING fail_mode=secure on bridge %s of %s (was %s): without it a "
                          "controller outage turns the bridge into a learning switch",
                          self.bridge, self.hypervisor, _first(row.fail_mode) or "unset")
        txn = ovs.db.idl.Transaction(idl)
        txn.add_comment(f"goldilocks: fail_mode=secure on {self.bridge}")
        row.verify("fail_mode")  # someone else's concurrent change wins; we re-check after
        row.fail_mode = [SECURE]
        self._txn = txn
        self._commit_pending()

    def _commit_pending(self) -> None:
        if self._txn is None:
            return
        status = self._txn.commit()
        if status == ovs.db.idl.Transaction.INCOMPLETE:
            return
        if status not in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
            self._log.error("could not set fail_mode=secure on %s of %s: %s %s", self.bridge,
                            self.hypervisor, status, self._txn.get_error() or "")
            self._last = None  # so the next change re-evaluates and retries
        self._txn = None


# --------------------------------------------------------------------------- helpers


def _snapshot(hypervisor: str, bridge: str, row: ovs.db.idl.Row,
              uplinks: Collection[str]) -> ObservedBridge:
    """Copy the IDL rows into plain dicts (inventory stays free of ovs) and convert. Each
    column is read once: every read of an IDL row's column converts it to Python anew."""
    bridge_row = {"name": row.name, "datapath_id": row.datapath_id,
                  "fail_mode": row.fail_mode, "datapath_type": row.datapath_type}
    port_rows: list[dict[str, Any]] = []
    interface_rows: list[dict[str, Any]] = []
    for port in _column(row, "ports"):
        if port is None:
            continue
        names = []
        for iface in _column(port, "interfaces"):
            if iface is None:
                continue
            interface = {"name": _column(iface, "name"), "ofport": _column(iface, "ofport"),
                         "external_ids": dict(_column(iface, "external_ids"))}
            interface_rows.append(interface)
            names.append(interface["name"])
        port_rows.append({"name": _column(port, "name"), "interfaces": names})
    return from_rows(hypervisor, bridge, bridge_row, port_rows, interface_rows, uplinks)


def _column(row: ovs.db.idl.Row, name: str) -> Any:
    """`getattr(row, name)`, faster for a row without local changes. python-ovs's Row rebuilds a
    set or map column from a copy of itself before converting it (to merge a transaction's
    pending changes), on every read: 4000 rows took 0.15 s of a 2000-port snapshot. Without
    pending changes the stored datum converts alone, to the same value. Uses python-ovs's
    private row state, so anything unexpected falls back to getattr."""
    try:
        if not row._changes and not row._mutations and name in row._data:
            return row._data[name].to_python(row._uuid_to_row)
    except (AttributeError, TypeError):
        pass
    return getattr(row, name)


def _bridge_row(idl: ovs.db.idl.Idl, bridge: str) -> ovs.db.idl.Row | None:
    return next((r for r in idl.tables["Bridge"].rows.values() if r.name == bridge), None)


def _is_connected(idl: ovs.db.idl.Idl) -> bool:
    # python-ovs has no public "connected" on Idl; the session is where the C IDL looks too.
    return bool(idl._session.is_connected()) and idl.state == idl.IDL_S_MONITORING


def _first(value: Any) -> Any:
    """OVSDB optional column ([] or [x]) as x or None."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _configure_ssl(private_key: str, certificate: str, ca_cert: str) -> None:
    # python-ovs keeps SSL files as process-wide class state: every ssl: remote shares them.
    ovs.stream.Stream.ssl_set_private_key_file(private_key)
    ovs.stream.Stream.ssl_set_certificate_file(certificate)
    ovs.stream.Stream.ssl_set_ca_cert_file(ca_cert)


def fetch_schema(remote: str, timeout_msec: int = SCHEMA_FETCH_MSEC) -> dict[str, Any]:
    """The Open_vSwitch schema, from the server (get_schema), for hosts without the file."""
    first = remote.split(",")[0]
    error, stream = ovs.stream.Stream.open_block(ovs.stream.Stream.open(first), timeout_msec)
    if error:
        raise OSError(error, f"cannot connect to {first}: {os.strerror(error)}")
    conn = ovs.jsonrpc.Connection(stream)
    try:
        request = ovs.jsonrpc.Message.create_request("get_schema", [DATABASE])
        reply = _transact(conn, request, ovs.timeval.msec() + timeout_msec)
    finally:
        conn.close()
    if reply.type != ovs.jsonrpc.Message.T_REPLY:
        raise RuntimeError(f"get_schema on {first} failed: {reply.error}")
    return reply.result


def _transact(conn: ovs.jsonrpc.Connection, request: ovs.jsonrpc.Message,
              deadline: int) -> ovs.jsonrpc.Message:
    """Send and wait for the reply, but never past ``deadline`` (transact_block can hang)."""
    error = conn.send(request)
    while not error:
        conn.run()
        error, reply = conn.recv()
        if reply is not None and reply.id == request.id:
            return reply
        if error == errno.EAGAIN:
            if ovs.timeval.msec() >= deadline:
                raise TimeoutError(f"no get_schema reply from {conn.name}")
            poller = ovs.poller.Poller()
            conn.wait(poller)
            conn.recv_wait(poller)
            poller.timer_wait_until(deadline)
            poller.block()
            error = 0
    raise OSError(error, f"get_schema on {conn.name} failed (error {error})")


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except OSError:
        pass  # pipe full: the thread is waking anyway


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
