"""Parsing of services and guest-reported app ports."""

from __future__ import annotations

import pytest

from controller.model import VM, Attr, Fact, Port, Provenance, parse_port


@pytest.mark.parametrize("text", ["tcp/80-", "tcp/8_0", "tcp/+80", "tcp/ 80", "tcp/0x50", "tcp/80-x"])
def test_sloppy_port_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a number or range"):
        parse_port(text)


@pytest.mark.parametrize("text,port", [("tcp/80", Port("tcp", 80, 80)), ("udp/1000-2000", Port("udp", 1000, 2000)),
                                       ("ICMP", Port("icmp")), ("any", Port("any"))])
def test_ports_parse(text: str, port: Port) -> None:
    assert parse_port(text) == port


@pytest.mark.parametrize("text,msg", [("tcp/0", "out of range"), ("udp/65536", "out of range"),
                                      ("tcp/90-80", "reversed"), ("sctp/1", "unknown protocol"),
                                      ("icmp/8", "takes no port"), ("tcp", "needs a port")])
def test_bad_ports_name_the_fault(text: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_port(text)


def test_a_guest_cannot_widen_an_app_rule_to_every_port() -> None:
    claim = Fact(Attr.APP, "postgres", "any,icmp,tcp/5432,garbage", Provenance.GUEST)
    vm = VM("u", "db", "hv1", (), frozenset({claim}))
    assert vm.app_ports("postgres") == (Port("tcp", 5432, 5432),)


def test_a_vms_facts_are_indexed_per_value_not_shared_by_a_replaced_copy() -> None:
    """values() keeps a sorted index on the VM; a replace() must see its own facts, and the
    index must not take part in equality or hashing."""
    from dataclasses import replace

    tag = Fact(Attr.TAG, "role", "desktop", Provenance.PLATFORM)
    vm = VM("u1", "desk1", "hv1", facts=frozenset({tag}))
    twin = VM("u1", "desk1", "hv1", facts=frozenset({tag}))
    assert vm.values(Attr.TAG, "role") == (tag,)
    assert vm.values(Attr.NAME) == (Fact(Attr.NAME, "", "desk1", Provenance.PLATFORM),)
    assert vm == twin and hash(vm) == hash(twin)

    app = Fact(Attr.APP, "postgres", "tcp/5432", Provenance.GUEST)
    other = Fact(Attr.TAG, "role", "admin", Provenance.GUEST)
    changed = replace(vm, facts=vm.facts | {app, other})
    assert changed.values(Attr.TAG, "role") == tuple(sorted((tag, other)))
    assert changed.facts_of(Attr.APP) == (app,)
    assert vm.values(Attr.TAG, "role") == (tag,) and vm.facts_of(Attr.APP) == ()
