"""Flow snapshots: the last table a bridge was confirmed to hold, for a restart to put back.

When ovs-vswitchd restarts while the controller is down (an upgrade restarting both, a crash),
a `fail_mode=secure` bridge comes back empty and drops everything until the controller has
imported os-ken and SQLAlchemy, loaded its state and compiled: seconds at 2,000 VMs. So the
controller stores, for each bridge it has in sync, the flow mods of that table; the next
process serves switches with a small standard-library listener (apps/restore.py) before it
imports anything heavy, and puts the table back — only onto an empty bridge, and only when
nothing it was compiled from can have changed:

- the database's state generation (bumped by every write that can change flows, whatever the
  path: controller/store/store.py) is the one the snapshot was taken at;
- the configuration file is byte for byte the one the controller ran with;
- no context it relied on has expired since (`valid_until`);
- the switch has exactly the ports (number and name) it had, and speaks OpenFlow 1.4.

Anything else — or any doubt — and the bridge stays empty (closed) for the full controller,
which reconciles every bridge as on any start, snapshot or not. Standard library only, and of
that only what is cheap to import (named tuples, not dataclasses; os.path, not pathlib): this
module is imported before the slow imports it exists to get ahead of.
"""

from __future__ import annotations

import os
from collections import namedtuple

from apps.restore import OFP_HEADER, OFP_VERSION, OFPT_FLOW_MOD

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (apps/restore.py)
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

OF14 = OFP_VERSION  # the only version restored: the app's bundles are OpenFlow 1.4's own messages

SQLITE_PREFIX = "sqlite:///"


class FlowSnapshot(namedtuple("FlowSnapshot",
                              "dpid generation config_digest ports valid_until taken_at flow_mods")):
    """One bridge's installed table as complete OFPT_FLOW_MOD (add) messages, and what it assumed."""

    __slots__ = ()
    dpid: int
    generation: int  # the store's state generation the table was compiled from
    config_digest: str  # sha256 of the configuration file the controller ran with
    ports: frozenset[tuple[int, str]]  # (OpenFlow port number, name) of the bridge's ports
    valid_until: float | None  # the first expiry of a context the table relied on (epoch)
    taken_at: float  # epoch
    flow_mods: tuple[bytes, ...]


def flow_mod_message(body: bytes) -> bytes:
    """A whole OpenFlow 1.4 flow mod from its body (apps/ofwire.flow_mod_body); xid 0, set when sent."""
    return OFP_HEADER.pack(OF14, OFPT_FLOW_MOD, OFP_HEADER.size + len(body), 0) + body


def pack_flow_mods(messages: Iterable[bytes]) -> bytes:
    """Messages as one blob: each carries its own length in its header."""
    return b"".join(messages)


def unpack_flow_mods(blob: bytes) -> tuple[bytes, ...]:
    """The messages of a blob; ValueError naming the offset if one is cut or not a flow mod."""
    out, at = [], 0
    while at < len(blob):
        if len(blob) - at < OFP_HEADER.size:
            raise ValueError(f"flow snapshot cut at byte {at}: {len(blob) - at} bytes left, a header is 8")
        version, kind, length, _ = OFP_HEADER.unpack_from(blob, at)
        if version != OF14 or kind != OFPT_FLOW_MOD or length < OFP_HEADER.size or at + length > len(blob):
            raise ValueError(f"flow snapshot holds no OpenFlow 1.4 flow mod at byte {at} "
                             f"(version {version:#x}, type {kind}, length {length})")
        out.append(blob[at:at + length])
        at += length
    return tuple(out)


def sqlite_path(url: str) -> str | None:
    """The file of a `sqlite:///PATH` URL; None for another database (no restore then)."""
    if not url.startswith(SQLITE_PREFIX) or "?" in url:
        return None
    path = url[len(SQLITE_PREFIX):]
    return path if path and path != ":memory:" else None


# ---- the decision (pure) ------------------------------------------------------------------------


def refusal(snapshot: FlowSnapshot | None, *, version: int, ports: frozenset[tuple[int, str]],
            flow_count: int, generation: int | None, digest: str, now: float) -> str | None:
    """Why `snapshot` must not go onto this switch, or None when it may."""
    if snapshot is None:
        return "no flow snapshot for this bridge"
    if flow_count:
        return f"the bridge holds {flow_count} flows: the controller reconciles them"
    if version != OF14:
        return f"the switch speaks OpenFlow version {version:#x}; snapshots are OpenFlow 1.4"
    if generation != snapshot.generation:
        return f"the database changed since the snapshot (generation {snapshot.generation} -> {generation})"
    if digest != snapshot.config_digest:
        return "the configuration file changed since the snapshot"
    if snapshot.valid_until is not None and now >= snapshot.valid_until:
        return "a context the snapshot relied on has expired since"
    if ports != snapshot.ports:
        return f"the bridge's ports changed since the snapshot ({_port_change(snapshot.ports, ports)})"
    return None


def _port_change(before: frozenset[tuple[int, str]], after: frozenset[tuple[int, str]]) -> str:
    gone, new = sorted(before - after), sorted(after - before)
    parts = ([f"gone: {', '.join(f'{n} {name}' for n, name in gone[:3])}"] if gone else []) + \
            ([f"new: {', '.join(f'{n} {name}' for n, name in new[:3])}"] if new else [])
    return "; ".join(parts)


# ---- reading them back (standard-library sqlite3, read-only) --------------------------------


class StoredSnapshots(namedtuple("StoredSnapshots", "generation by_dpid")):
    __slots__ = ()
    generation: int | None  # None: a database without snapshots (older schema, or none yet)
    by_dpid: Mapping[int, FlowSnapshot]


def load_snapshots(path: str | os.PathLike[str]) -> StoredSnapshots:
    """Every bridge's snapshot and the current state generation, in one read transaction.
    A missing file or table reads as none; a damaged snapshot is skipped (the full controller
    repairs the bridge as on any start)."""
    # Imported here, not at the top: a restore shakes hands with its switch while the starting
    # thread imports this (with functools and collections, ~4 ms) and reads the snapshots
    # (controller/warmstart.py). sqlite3 is this C module plus adapters that import datetime.
    import _sqlite3 as sqlite3

    if not os.path.exists(path):
        return StoredSnapshots(None, {})
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return StoredSnapshots(None, {})
    try:
        with db:
            db.execute("BEGIN")
            generation = db.execute("SELECT value FROM state_generation WHERE id = 1").fetchone()
            rows = db.execute("SELECT dpid, generation, config_digest, ports, valid_until, taken_at, flow_mods "
                              "FROM flow_snapshots").fetchall()
    except sqlite3.Error:
        return StoredSnapshots(None, {})
    finally:
        db.close()
    snapshots = (_snapshot(row) for row in rows)
    return StoredSnapshots(generation[0] if generation else None,
                           {s.dpid: s for s in snapshots if s is not None})


def _snapshot(row: Sequence[object]) -> FlowSnapshot | None:
    dpid, generation, digest, ports, valid_until, taken_at, blob = row
    try:
        return FlowSnapshot(int(str(dpid)), int(generation), str(digest),  # type: ignore[call-overload]
                            decode_ports(str(ports)), None if valid_until is None else float(valid_until),  # type: ignore[arg-type]
                            float(taken_at), unpack_flow_mods(bytes(blob)))  # type: ignore[arg-type, call-overload]
    except (TypeError, ValueError):
        return None


def encode_ports(ports: frozenset[tuple[int, str]]) -> str:
    """The ports column: JSON, `[[1, "vnet0"], [2, "vnet1"]]`, sorted."""
    import json  # here, not at the top: json loads re, ~10 ms of a restore's start

    return json.dumps(sorted([n, name] for n, name in ports))


def decode_ports(text: str) -> frozenset[tuple[int, str]]:
    plain = _plain_ports(text)
    if plain is not None:
        return plain
    import json  # a name JSON escapes (rare): the full decoder, imported only then

    return frozenset((int(n), str(name)) for n, name in json.loads(text))


# What json.dumps writes verbatim inside quotes: ports named only with these (all of libvirt's
# and Goldilocks' own) are read back without importing json.
_PLAIN_NAME = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:@+=/")


def _plain_ports(text: str) -> frozenset[tuple[int, str]] | None:
    """`text` read without json when it is exactly what encode_ports writes for plain names
    (checked by writing it again); None for anything else."""
    if text == "[]":
        return frozenset()
    if not (text.startswith("[[") and text.endswith('"]]')):
        return None
    pairs = []
    for item in text[2:-2].split("], ["):
        number, sep, name = item.partition(', "')
        if not sep or not (number.isascii() and number.isdigit()) or not name.endswith('"'):
            return None
        name = name[:-1]
        if not _PLAIN_NAME.issuperset(name):
            return None
        pairs.append((int(number), name))
    if "[" + ", ".join(f'[{n}, "{name}"]' for n, name in sorted(pairs)) + "]" != text:
        return None
    return frozenset(pairs)
