"""The Goldilocks os-ken app: a thin shim between OpenFlow switches and the runtime.

It turns switch messages into runtime events (posted to the service's single writer queue) and
executes the runtime's switch commands: flow dumps under the Goldilocks cookie prefix, and every
change as one atomic bundle. Open vSwitch drops an add it refuses from a bundle and would commit
the rest, so a bundle goes in two phases (the adds, a barrier, and only when the switch refused
none of them the commit and another barrier, else a discard) unless every flow in it has a shape
(`apps.ofwire.flow_shape`) this switch already accepted on this connection: OVS refuses a flow
mod for its form, never for its addresses, so such a bundle is sent in one phase and saves the
switch a round trip. Should the switch refuse an add of a one-phase bundle all the same, the
runtime is told the bundle failed and re-reads the table before anything else. The app holds no
policy state of its own; it never installs a table-miss flow and never flushes a table.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import (
    CONFIG_DISPATCHER,
    DEAD_DISPATCHER,
    MAIN_DISPATCHER,
    set_ev_cls,
)
from os_ken.ofproto import ofproto_v1_3, ofproto_v1_4

from apps.ofcodec import DecodeError, decode_flow_stats, flow_stats_request
from apps.ofwire import (
    BundleXids,
    Shape,
    encode_commit,
    encode_direct,
    encode_discard,
    encode_staged,
    flow_shape,
    reserve_xids,
)
from controller.flows.pipeline import COOKIE_PREFIX, COOKIE_PREFIX_MASK, cookie_ident, cookie_kind
from controller.flows.reconcile import FlowOp
from controller.flows.types import FlowSpec
from controller.runtime import (
    BundleCommitted,
    BundleFailed,
    CountersRead,
    FlowsDumped,
    FlushConntrack,
    ReadCounters,
    RequestDump,
    SendBundle,
    SwitchCommand,
    SwitchConnected,
    SwitchDisconnected,
    SwitchEvent,
)

LOG = logging.getLogger("goldilocks.southbound")

NX_VENDOR_ID = 0x00002320
NXT_CT_FLUSH_ZONE = 29
# Shapes of a committed bundle are learnt this many flows (about a millisecond) at a time, with
# a short sleep between batches: the engine thread, which has the BundleCommitted just posted to
# process, takes the GIL then. (A sleep(0) hands it over too rarely: the releasing thread
# usually takes it straight back.)
LEARN_BATCH = 500
LEARN_PAUSE_S = 0.0005


class Sink(Protocol):
    """Where switch events go: the service's queue, drained by the one engine thread."""

    def post(self, event: SwitchEvent) -> None: ...


_sink: Sink | None = None


def attach(sink: Sink) -> None:
    """Called by the launcher before os-ken instantiates the app."""
    global _sink
    _sink = sink


@dataclass
class _Bundle:
    id: int
    xids: BundleXids
    ops: dict[int, FlowOp]  # xid of each add message -> the op it carries
    errors: list[str] = field(default_factory=list)  # adds (or the open) the switch refused
    committing: bool = False  # staged (adds sent, waiting for their barrier) until the commit goes
    direct: bool = False  # sent in one phase: open, adds and commit together


@dataclass(frozen=True)
class _Next:
    """What a reply means for a bundle, decided under the lock and done after it: the bytes to
    send (commit or discard) and the event to post."""

    send: bytes = b""
    post: SwitchEvent | None = None
    learn: tuple[FlowOp, ...] = ()  # a committed two-phase bundle: shapes the switch accepts


@dataclass
class _Switch:
    datapath: Any
    dump: list[FlowSpec] = field(default_factory=list)
    undecodable: int = 0
    bundle: _Bundle | None = None
    polling: dict[int, int] = field(default_factory=dict)  # the counters poll in flight: xid -> rule cookie
    counters: dict[int, tuple[int, int]] = field(default_factory=dict)
    accepted: set[Shape] = field(default_factory=set)  # flow shapes this connection's switch took


class GoldilocksApp(app_manager.OSKenApp):
    OFP_VERSIONS = [ofproto_v1_4.OFP_VERSION, ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _sink is None:
            raise RuntimeError("apps.goldilocks_app.attach(service) must run before os-ken loads the app")
        self.sink: Sink = _sink
        self._switches: dict[int, _Switch] = {}
        self._lock = threading.Lock()  # handlers run on each switch's thread; commands on the engine's
        register_southbound(self)

    def switch_ports(self, dpid: int) -> tuple[int, frozenset[tuple[int, str]]] | None:
        """(OpenFlow version, (number, name) of each port below OFPP_MAX) of a connected switch,
        as os-ken keeps them from the port-description reply and port-status messages."""
        with self._lock:
            sw = self._switches.get(dpid)
        if sw is None:
            return None
        dp = sw.datapath
        ports = frozenset((int(no), _port_name(port.name)) for no, port in dict(dp.ports or {}).items()
                          if no < dp.ofproto.OFPP_MAX)
        return dp.ofproto.OFP_VERSION, ports

    # ---- switch -> runtime -------------------------------------------------------------------

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _features(self, ev: Any) -> None:
        dp = ev.msg.datapath
        with self._lock:
            self._switches[dp.id] = _Switch(dp)
        LOG.info("switch %016x connected (OpenFlow 0x%02x) from %s", dp.id, dp.ofproto.OFP_VERSION, dp.address)
        self.sink.post(SwitchConnected(dp.id))

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    def _gone(self, ev: Any) -> None:
        dp = ev.datapath
        if dp.id is None:
            return
        with self._lock:
            sw = self._switches.get(dp.id)
            if sw is None or sw.datapath is not dp:
                return  # an older connection of a switch that has since reconnected
            del self._switches[dp.id]
        LOG.warning("switch %016x disconnected; its flows stay (fail_mode=secure)", dp.id)
        self.sink.post(SwitchDisconnected(dp.id))

    @set_ev_cls(ofp_event.EventOFPFlowStatsReply, MAIN_DISPATCHER)
    def _flow_stats(self, ev: Any) -> None:
        dp = ev.msg.datapath
        with self._lock:
            sw = self._switches.get(dp.id)
            if sw is None:
                return
            for stats in ev.msg.body:
                try:
                    sw.dump.append(decode_flow_stats(stats))
                except DecodeError as exc:
                    sw.undecodable += 1
                    LOG.warning("switch %016x: flow under our cookie we cannot read (%s); it will be replaced", dp.id, exc)
            if ev.msg.flags & dp.ofproto.OFPMPF_REPLY_MORE:
                return
            flows, bad = frozenset(sw.dump), sw.undecodable
            sw.dump, sw.undecodable = [], 0
        self.sink.post(FlowsDumped(dp.id, flows, bad))

    @set_ev_cls(ofp_event.EventOFPAggregateStatsReply, MAIN_DISPATCHER)
    def _aggregate(self, ev: Any) -> None:
        """One rule's counters on this switch: the sum over the flows under its cookie
        (conjunction clauses count nothing in OVS; the rule's conj_id flows do)."""
        dp = ev.msg.datapath
        with self._lock:
            sw = self._switches.get(dp.id)
            if sw is None or ev.msg.xid not in sw.polling:
                return
            sw.counters[sw.polling.pop(ev.msg.xid)] = (ev.msg.body.packet_count, ev.msg.body.byte_count)
            if sw.polling:
                return
            counters, sw.counters = sw.counters, {}
        self.sink.post(CountersRead(dp.id, counters))

    @set_ev_cls(ofp_event.EventOFPErrorMsg, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    def _error(self, ev: Any) -> None:
        msg = ev.msg
        dp = msg.datapath
        with self._lock:
            sw = self._switches.get(dp.id)
            bundle = sw.bundle if sw is not None else None
            step = self._bundle_error(sw, bundle, msg) if sw is not None and bundle is not None else None
        if step is None:
            LOG.error("switch %016x error %s (xid %d)", dp.id, error_name(dp.ofproto, msg), msg.xid)
            return
        self._do(dp, step)

    def _bundle_error(self, sw: _Switch, bundle: _Bundle, msg: Any) -> _Next | None:
        """Under the lock. A refused add (or open) is only noted: the staged barrier's reply,
        which comes after every add's error, decides. An error for a barrier or the commit ends
        the bundle now (a failed commit applies nothing); None: not this bundle's."""
        error = error_name(msg.datapath.ofproto, msg)
        op = bundle.ops.get(msg.xid)
        if op is not None or msg.xid == bundle.xids.open():
            bundle.errors.append(describe_rejection(op, error) if op else f"switch refused to open the bundle: {error}")
            return _Next()
        if msg.xid not in (bundle.xids.staged(), bundle.xids.commit(), bundle.xids.barrier()):
            return None
        if not bundle.errors:  # a refused add already says why (OVS names it at commit too)
            bundle.errors.append(f"bundle refused ({error})")
        return self._end(sw, bundle)

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def _barrier(self, ev: Any) -> None:
        dp = ev.msg.datapath
        with self._lock:
            sw = self._switches.get(dp.id)
            bundle = sw.bundle if sw is not None else None
            if sw is None or bundle is None:
                return
            if ev.msg.xid == bundle.xids.staged() and not bundle.committing:
                step = self._staged(sw, bundle)
            elif ev.msg.xid == bundle.xids.barrier() and bundle.committing:
                step = self._end(sw, bundle)
            else:
                return
        self._do(dp, step)

    def _staged(self, sw: _Switch, bundle: _Bundle) -> _Next:
        """Under the lock: every add has been answered. All of them in the bundle: commit it;
        one refused: the bundle ends here, discarded."""
        if bundle.errors:
            return self._end(sw, bundle)
        bundle.committing = True
        return _Next(send=encode_commit(sw.datapath.ofproto.OFP_VERSION, bundle.id, bundle.xids))

    def _end(self, sw: _Switch, bundle: _Bundle) -> _Next:
        """Under the lock: the bundle is over. Committed if nothing was refused; otherwise
        failed, and if still staged (never committed) discarded, so the table stays as it was."""
        sw.bundle = None
        dpid = sw.datapath.id
        if not bundle.errors:
            learn = () if bundle.direct else tuple(bundle.ops.values())
            return _Next(post=BundleCommitted(dpid, bundle.id), learn=learn)
        reason = "; ".join(bundle.errors)
        if bundle.direct:
            sw.accepted.clear()  # it refused a shape it took before: trust none until re-learnt
            LOG.error("switch %016x: one-phase bundle %d partly refused, the table will be read again: %s",
                      dpid, bundle.id, reason)
        else:
            LOG.error("switch %016x: bundle %d failed, table left as it was: %s", dpid, bundle.id, reason)
        discard = b"" if bundle.committing else encode_discard(sw.datapath.ofproto.OFP_VERSION, bundle.id, bundle.xids)
        return _Next(send=discard, post=BundleFailed(dpid, bundle.id, reason))

    def _do(self, dp: Any, step: _Next) -> None:
        """Outside the lock: a send may wait for the connection's queue. The shapes of a
        committed bundle are learnt after its event is posted, off the runtime's path."""
        if step.send:
            dp.send(step.send)
        if step.post is not None:
            self.sink.post(step.post)
        if step.learn:
            shapes: set[Shape] = set()
            for start in range(0, len(step.learn), LEARN_BATCH):
                shapes.update([flow_shape(op.flow) for op in step.learn[start:start + LEARN_BATCH]])
                time.sleep(LEARN_PAUSE_S)
            with self._lock:
                sw = self._switches.get(dp.id)
                if sw is not None and sw.datapath is dp:
                    sw.accepted |= shapes

    # ---- runtime -> switch -------------------------------------------------------------------

    def execute(self, command: SwitchCommand) -> None:
        with self._lock:
            sw = self._switches.get(command.dpid)
        if sw is None:
            return  # it went away; its reconnect will dump and reconcile
        if isinstance(command, RequestDump):
            self._request_dump(sw)
        elif isinstance(command, SendBundle):
            self._send_bundle(sw, command)
        elif isinstance(command, FlushConntrack):
            self._flush_zones(sw, command.zones)
        elif isinstance(command, ReadCounters):
            self._read_counters(sw, command.cookies)

    def _read_counters(self, sw: _Switch, cookies: tuple[int, ...]) -> None:
        """One aggregate request per rule: the switch sums, so a bridge of tens of thousands of
        flows costs as many small replies as there are rules, not a dump to parse."""
        dp = sw.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        requests = []
        for ck in cookies:
            request = parser.OFPAggregateStatsRequest(dp, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY,
                                                      ck, 0xFFFFFFFFFFFFFFFF, parser.OFPMatch())
            dp.set_xid(request)
            requests.append(request)
        with self._lock:
            if sw.polling or not requests:
                return  # the previous poll has not finished, or nothing to count
            sw.polling, sw.counters = {r.xid: ck for r, ck in zip(requests, cookies)}, {}
        for request in requests:
            dp.send_msg(request)

    def _request_dump(self, sw: _Switch) -> None:
        dp = sw.datapath
        with self._lock:
            sw.dump, sw.undecodable = [], 0
        dp.send_msg(flow_stats_request(dp.ofproto, dp.ofproto_parser, dp, COOKIE_PREFIX, COOKIE_PREFIX_MASK))

    def _send_bundle(self, sw: _Switch, command: SendBundle) -> None:
        """Phase one: open, one add per flow op, barrier (apps/ofwire.py writes the bytes); the
        barrier's reply sends the commit or the discard (_barrier). A bundle of known shapes
        only goes in one phase, its commit right after the adds. The xids are reserved as one
        block and the bundle registered before the first byte goes out, so an error for any add
        names its flow; the bytes go out in chunks so the switch parses the first adds while the
        rest is encoded. No lock is held while sending."""
        dp = sw.datapath
        xids = reserve_xids(dp, len(command.ops))
        bundle = _Bundle(command.bundle, xids, xids.ops(command.ops))
        with self._lock:
            known = frozenset(sw.accepted)
        bundle.direct = bool(known) and all(flow_shape(op.flow) in known for op in command.ops)
        bundle.committing = bundle.direct
        encode = encode_direct if bundle.direct else encode_staged
        with self._lock:
            sw.bundle = bundle
        try:
            for chunk in encode(dp.ofproto.OFP_VERSION, command.bundle, xids, command.ops):
                dp.send(chunk)
        except Exception:
            # A flow that cannot be encoded: what went out is an open bundle never committed.
            with self._lock:
                if sw.bundle is bundle:
                    sw.bundle = None
            raise
        LOG.info("switch %016x: bundle %d with %d flow mods%s", dp.id, command.bundle, len(command.ops),
                 " (one phase)" if bundle.direct else "")

    def _flush_zones(self, sw: _Switch, zones: tuple[int, ...]) -> None:
        dp = sw.datapath
        for zone in zones:
            dp.send_msg(dp.ofproto_parser.OFPExperimenter(
                dp, NX_VENDOR_ID, NXT_CT_FLUSH_ZONE, struct.pack("!6xH", zone)))  # nx_zone_id: zero[6], zone


_SOUTHBOUND: list[GoldilocksApp] = []


def _port_name(name: bytes | str) -> str:
    return name.rstrip(b"\0").decode(errors="replace") if isinstance(name, bytes) else name.rstrip("\0")


def register_southbound(app: GoldilocksApp) -> None:
    _SOUTHBOUND.append(app)


def southbound() -> GoldilocksApp | None:
    return _SOUTHBOUND[-1] if _SOUTHBOUND else None


def describe_rejection(op: FlowOp, error: str) -> str:
    f = op.flow
    kind = cookie_kind(f.cookie)
    owner = f"cookie {f.cookie:#x}" if kind is None else f"{kind.name.lower()} {cookie_ident(f.cookie):#x}"
    origin = f" ({f.origin})" if f.origin else ""
    return f"switch refused {op.kind.value} of flow table={f.table} priority={f.priority} from {owner}{origin}: {error}"


_ERROR_CODE_PREFIX = {
    "OFPET_BAD_REQUEST": "OFPBRC_", "OFPET_BAD_ACTION": "OFPBAC_", "OFPET_BAD_INSTRUCTION": "OFPBIC_",
    "OFPET_BAD_MATCH": "OFPBMC_", "OFPET_FLOW_MOD_FAILED": "OFPFMFC_", "OFPET_BUNDLE_FAILED": "OFPBFC_",
    "OFPET_TABLE_FEATURES_FAILED": "OFPTFFC_",
}


# Open vSwitch's own errors (lib/ofp-errors.h, NX1.2+ numbers) that a change of ours can meet.
_NX_ERRORS = {4: "NXBRC_MUST_BE_ZERO", 42: "NXBAC_CT_DATAPATH_SUPPORT", 43: "NXBMC_CT_DATAPATH_SUPPORT"}


def error_name(ofp: Any, msg: Any) -> str:
    """"OFPET_FLOW_MOD_FAILED/OFPFMFC_TABLE_FULL" rather than "type=5 code=1"; an experimenter's
    error (Open vSwitch's own, e.g. a datapath lacking a conntrack feature) by vendor and type."""
    err_type, err_code = msg.type, msg.code
    if err_type == ofp.OFPET_EXPERIMENTER:
        if msg.experimenter == NX_VENDOR_ID and msg.exp_type in _NX_ERRORS:
            return f"OFPET_EXPERIMENTER/{_NX_ERRORS[msg.exp_type]}"
        return f"OFPET_EXPERIMENTER/{msg.experimenter:#x} exp_type={msg.exp_type}"
    tname = next((n for n in dir(ofp) if n.startswith("OFPET_") and getattr(ofp, n) == err_type), None)
    prefix = _ERROR_CODE_PREFIX.get(tname or "")
    cname = next((n for n in dir(ofp) if prefix and n.startswith(prefix) and getattr(ofp, n) == err_code), None)
    if tname and cname:
        return f"{tname}/{cname}"
    return f"error type={err_type} code={err_code}"
