"""One Goldilocks process: OVSDB monitors, the os-ken app manager and the engine thread.

Everything that changes state goes through one queue into one engine thread (the single
writer). The os-ken app and the OVSDB monitors only post events; the engine thread runs the
pure runtime and hands its switch commands back to the app.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from controller.config import Config
from controller.events import ContextExpiry, ContextReported, Event
from controller.facade import EngineFacade, HitCounter
from controller.runtime import (
    BridgeSync,
    CountersRead,
    Runtime,
    SwitchCommand,
    SwitchEvent,
    SyncState,
    Tick,
)

if TYPE_CHECKING:
    from controller.warmstart import Restores

LOG = logging.getLogger("goldilocks.service")
TICK_SECONDS = 0.25
# A bridge past its first dump: its first flows are sent (or it is in sync, or backing off).
FIRST_FLOWS_SENT = frozenset({SyncState.APPLYING, SyncState.IN_SYNC, SyncState.BACKOFF})
# At start the REST API waits, at most this long, until every monitored bridge is settled (see
# Service.settled): importing and starting it takes most of a second of CPU, which would slow
# the first OVSDB snapshot and flow computation it runs beside (one GIL), i.e. enforcement.
API_WAITS_AT_MOST_S = 5.0


class _Call:
    """A read (or a test's probe) run on the engine thread, answered through a future."""

    def __init__(self, fn: Callable[[Runtime], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Service:
    def __init__(self, config: Config, runtime: Runtime, clock: Callable[[], float] = time.monotonic,
                 audit: Callable[[str, str, dict[str, Any]], None] | None = None,
                 persist_quarantine: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None) -> None:
        self.config = config
        self._persist_quarantine = persist_quarantine
        self._quarantine_saved: tuple[Any, Any] | None = None
        self._audit = audit  # (action, target, details): effects of context changes on flows
        self.runtime = runtime
        self._queue: queue.Queue[Event | SwitchEvent | _Call | None] = queue.Queue()
        self._clock = clock
        self._stop = threading.Event()
        self._execute: Callable[[SwitchCommand], None] | None = None
        self._thread: threading.Thread | None = None
        self.monitors: list[Any] = []
        self._monitored: frozenset[str] | None = None  # hypervisors with an OVSDB monitor, once started
        self.settled = threading.Event()  # every monitored bridge is past the start's heavy part
        self.hits = HitCounter()
        self.facade = EngineFacade(self.call, self.post, self.hits, alive=self.engine_alive)
        self._on_in_sync: Callable[[str], None] | None = None  # e.g. apps/snapshots.py

    def post(self, event: Event | SwitchEvent) -> None:
        self._queue.put(event)

    def call(self, fn: Callable[[Runtime], Any], timeout: float = 30.0) -> Any:
        """Run `fn(runtime)` on the engine thread, between events, and return what it returns."""
        item = _Call(fn)
        self._queue.put(item)
        if not item.done.wait(timeout):
            raise TimeoutError("the engine did not answer in time")
        if item.error is not None:
            raise item.error
        return item.result

    def engine_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def attach_southbound(self, execute: Callable[[SwitchCommand], None]) -> None:
        self._execute = execute

    def on_in_sync(self, notify: Callable[[str], None]) -> None:
        """`notify(hypervisor)` on the engine thread each time a bridge reaches in sync."""
        self._on_in_sync = notify

    def start_engine(self) -> None:
        self._thread = threading.Thread(target=self._engine_loop, name="goldilocks-engine", daemon=True)
        self._thread.start()

    def start_monitors(self) -> None:
        from topology.ovsdb import OvsdbMonitor  # the shell's OVSDB client

        for hv in self.config.hypervisors.values():
            if hv.name not in self.runtime.engine.hypervisor_records():
                LOG.error("hypervisor %s is in the config but not in the scenario: ignored", hv.name)
                continue
            ssl = (str(hv.ovsdb_tls.key), str(hv.ovsdb_tls.cert), str(hv.ovsdb_tls.ca)) if hv.ovsdb_tls else None
            mon = OvsdbMonitor(hv.name, hv.ovsdb, hv.bridge, lambda ob: self.post(ob.to_event()),
                               uplinks=hv.uplinks, set_fail_secure=hv.set_fail_secure, ssl=ssl)
            mon.start()
            self.monitors.append(mon)
        self._monitored = frozenset(m.hypervisor for m in self.monitors)
        if not self._monitored:
            self.settled.set()  # no bridge to wait for; else the engine thread decides

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for mon in self.monitors:
            mon.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _engine_loop(self) -> None:
        last_tick = self._clock()
        while not self._stop.is_set():
            try:
                event = self._queue.get(timeout=TICK_SECONDS)
            except queue.Empty:
                event = Tick()
            if event is None:
                break
            if isinstance(event, _Call):
                self._answer(event)
                continue
            if isinstance(event, CountersRead):
                self.hits.update(event.dpid, event.counters, time.time())
                continue
            now = self._clock()
            if not isinstance(event, Tick) and now - last_tick >= TICK_SECONDS:
                self._tick(now)
                last_tick = now
            if isinstance(event, Tick):
                self._tick(now)
                last_tick = now
            else:
                self._run(event, now)

    def _tick(self, now: float) -> None:
        self._run(Tick(), now)
        # Context time-to-live is wall-clock time (expires_at is an epoch, stored in the database).
        self._run(ContextExpiry(time.time()), now)

    def _answer(self, item: _Call) -> None:
        try:
            item.result = item.fn(self.runtime)
        except BaseException as exc:  # handed to the caller, not swallowed
            item.error = exc
        item.done.set()

    def _run(self, event: Event | SwitchEvent, now: float) -> None:
        before = {b.hypervisor: b.state for b in self.runtime.bridges()}
        try:
            commands = self.runtime.handle(event, now)
        except Exception:  # one bad event must not stop enforcement for everyone
            LOG.exception("engine failed on %r", type(event).__name__)
            return
        self._log_transitions(before)
        self._note_settled()
        # Stored before a flow goes out: a quarantine the switches enforce survives a restart.
        self._save_quarantine()
        for cmd in commands:
            if self._execute is None:
                LOG.error("no southbound attached; dropping %s", type(cmd).__name__)
                continue
            try:
                self._execute(cmd)
            except Exception:
                LOG.exception("southbound failed on %s", type(cmd).__name__)
        # After: a context change's flows do not wait for the record of what they did.
        self._audit_effect(event)


    def _note_settled(self) -> None:
        monitored = self._monitored
        if monitored is None or self.settled.is_set():
            return
        bridges = {b.hypervisor: b for b in self.runtime.bridges()}
        if all(hv in bridges and self._bridge_settled(bridges[hv]) for hv in monitored):
            self.settled.set()

    def _bridge_settled(self, b: BridgeSync) -> bool:
        """Its first flows are sent; or its OVSDB snapshot is in (it has a dpid) and its switch
        is not connected: nothing is computed for it until the switch connects, which may take
        the switch's reconnection backoff."""
        return b.state in FIRST_FLOWS_SENT or (b.dpid is not None and not self.runtime.connected(b.dpid))

    def _save_quarantine(self) -> None:
        """Quarantine is truth that must survive a restart: store it whenever it changes."""
        if self._persist_quarantine is None:
            return
        state = (dict(self.runtime.engine.quarantined()), dict(self.runtime.engine.released()))
        if state == self._quarantine_saved:
            return
        try:
            self._persist_quarantine(*state)
            self._quarantine_saved = state
        except Exception:
            LOG.exception("could not store the quarantine state; retrying on the next event")

    def _audit_effect(self, event: Event | SwitchEvent) -> None:
        """A context change (or its expiry) and what it did to the flows, in the audit log."""
        if self._audit is None or not isinstance(event, (ContextReported, ContextExpiry)):
            return
        effect: dict[str, Any] = {"flows": self.runtime.last_effect}
        if isinstance(event, ContextExpiry):
            expired = self.runtime.engine.last_expired
            if not expired:
                return  # the clock ticked and nothing expired
            action, target = "context.expired", ",".join(f"vm:{uuid}" for uuid, _ in expired)
            effect["expired"] = [{"vm": uuid, "provenance": p} for uuid, p in expired]
        else:
            action, target = "context.effect", f"vm:{event.uuid}"
        try:
            self._audit(action, target, effect)
        except Exception:
            LOG.exception("could not audit the effect of %s", type(event).__name__)

    def _log_transitions(self, before: dict[str, SyncState]) -> None:
        for b in self.runtime.bridges():
            if before.get(b.hypervisor) is b.state:
                continue
            if b.state is SyncState.IN_SYNC:
                LOG.info("bridge of %s in sync: %d flows (%d bundles, %d flow mods sent so far)", b.hypervisor,
                         len(b.installed or ()), b.bundles_sent, b.flow_mods_sent)
                if self._on_in_sync is not None:
                    self._on_in_sync(b.hypervisor)
            elif b.state is SyncState.BACKOFF:
                LOG.error("bridge of %s out of sync, retry in %.1f s: %s", b.hypervisor,
                          (b.retry_at or 0) - self._clock(), b.last_error)
            else:
                LOG.info("bridge of %s: %s", b.hypervisor, b.state.value)


def configure_os_ken(config: Config) -> None:
    """os-ken reads its listener settings from oslo.config; set them before apps load."""
    from os_ken import cfg

    conf = cfg.CONF
    conf(args=[], project="os_ken", default_config_files=[])
    conf.set_override("ofp_listen_host", config.listen)
    if config.tls is None:
        conf.set_override("ofp_tcp_listen_port", config.port)
    else:
        conf.set_override("ofp_ssl_listen_port", config.port)
        conf.set_override("ofp_tcp_listen_port", config.port)
        conf.set_override("ctl_privkey", str(config.tls.key))
        conf.set_override("ctl_cert", str(config.tls.cert))
        conf.set_override("ca_certs", str(config.tls.ca))


def start_api(config: Config, store: Any, service: Service) -> Any:
    """The REST API in its own thread (uvicorn); it talks to the engine only through the facade."""
    import uvicorn

    from controller.api.app import create_app

    app = create_app(store, service.facade)
    # httptools and uvloop (C) instead of h11 and asyncio's loop: GET /health 2.3 -> 1.5 ms round
    # trip on the bench machine (authenticated requests gain as much; their variance is larger).
    server = uvicorn.Server(uvicorn.Config(app, host=config.api_listen, port=config.api_port or 8080,
                                           log_level="warning", access_log=False, http="httptools", loop="uvloop"))
    threading.Thread(target=server.run, name="goldilocks-api", daemon=True).start()
    return server


# The engine holds hundreds of thousands of small immutable objects (flows, matches) that live
# as long as the world does. With CPython's default thresholds a full collection walks them all
# again and again while a fleet is compiled (N=2000 VMs: 2.0 s instead of 0.8 s for one OVSDB
# snapshot); collecting young objects less often and freezing what boot built keeps cycles
# collected without rescanning the world.
GC_THRESHOLDS = (100_000, 50, 1000)
# The API, the engine and the switch connections are threads sharing one GIL. With CPython's
# default 5 ms a thread that has work (an API response, a barrier reply) waits for a compiling
# engine that long each time: a publish at N=1000 VMs answered in 26 ms instead of 13.
SWITCH_INTERVAL_S = 0.001


def tune_interpreter() -> None:
    """The controller process's GC thresholds and GIL switch interval (above)."""
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def run(config: Config, restores: Restores | None = None) -> int:
    """Run until SIGTERM/SIGINT. Flows stay on the switches when it stops. Raises ScenarioError,
    before starting anything, if the database is empty and the scenario to seed it does not load.
    `restores` (controller/warmstart.py) are putting flow snapshots back meanwhile."""
    tune_interpreter()
    from os_ken.base import app_manager

    import apps.goldilocks_app as app_module
    from apps.guard import install_guard
    from apps.snapshots import SnapshotWriter
    from controller.boot import engine_from_state, open_store

    store = open_store(config.database_url, config.scenario)
    configure_os_ken(config)
    install_guard(logging.getLogger("goldilocks.guard"))
    now = time.time()
    quarantined, released = store.quarantine_state()
    engine = engine_from_state(store.load_state(now), now, quarantine=config.quarantine,
                               quarantined=quarantined, released=released)
    service = Service(config, Runtime(engine),
                      audit=lambda action, target, details: store.record_event(
                          actor="system", action=action, target=target, details=details),
                      persist_quarantine=lambda q, r: store.save_quarantine(q, r, actor="engine"))
    app_module.attach(service)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    manager = app_manager.AppManager.get_instance()
    manager.load_apps(["apps.goldilocks_app", *config.apps])
    contexts = manager.create_contexts()
    if restores is not None:
        restores.wait()  # a bridge being restored is not also reconciled
    manager.instantiate_apps(**contexts)
    app = app_module.southbound()
    assert app is not None
    service.attach_southbound(app.execute)
    snapshots = SnapshotWriter(store, service.call, app, config.digest)
    service.on_in_sync(snapshots.in_sync)
    snapshots.start()
    gc.freeze()  # what boot built lives as long as the process
    service.start_engine()
    service.start_monitors()
    api = None
    if config.api_port:
        _wait_settled(service, stop, API_WAITS_AT_MOST_S)
        api = start_api(config, store, service)
    LOG.info("Goldilocks running: OpenFlow on %s:%d%s, %d hypervisors, database %s%s", config.listen, config.port,
             " (TLS)" if config.tls else "", len(config.hypervisors), _safe_url(config.database_url),
             f", API on http://{config.api_listen}:{config.api_port}" if api else "")
    stop.wait()
    LOG.info("stopping; flows stay on the switches (fail_mode=secure)")
    if api is not None:
        api.should_exit = True
    snapshots.stop()
    service.stop()
    store.close()
    logging.shutdown()
    # os-ken's native hub threads are not daemons and cannot be joined cleanly.
    os._exit(0)


def _wait_settled(service: Service, stop: threading.Event, limit: float) -> None:
    """Until every monitored bridge is settled, `limit` seconds pass or a signal asks to stop."""
    deadline = time.monotonic() + limit
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        if service.settled.wait(min(left, 0.05)):
            return


def _safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
