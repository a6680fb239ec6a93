"""The relay's checks of a guest line, its token bucket and the API body it builds."""

from __future__ import annotations

import json

import pytest

from agent import messages
from agent.ratelimit import TokenBucket

CONTEXT = {
    "users": ["alice"],
    "apps": {"postgres": ["tcp/5432"]},
    "os": "Debian GNU/Linux 12",
    "labels": ["pci"],
    "posture": {"disk_encrypted": "pass"},
}


def line(**fields: object) -> bytes:
    body = {"seq": 7, "kind": "report", "sent_at": 1700000000.5, "context": CONTEXT, **fields}
    return json.dumps(body).encode()


def reason(raw: bytes) -> str:
    with pytest.raises(messages.Drop) as caught:
        messages.parse(raw)
    return caught.value.reason


def test_a_good_line() -> None:
    msg = messages.parse(line())
    assert (msg.seq, msg.kind, msg.sent_at) == (7, "report", 1700000000.5)
    assert msg.context == CONTEXT


def test_unknown_context_keys_are_not_forwarded() -> None:
    msg = messages.parse(
        line(context={**CONTEXT, "groups": {"alice": ["admins"]}, "hostname": "db1"})
    )
    assert set(msg.context) == {"users", "apps", "os", "labels", "posture"}


@pytest.mark.parametrize(
    "raw",
    [
        line(vm="web2"),
        line(uuid="0b0e..."),
        line(VM="x"),
        line(vm_uuid="x"),
        line(context={**CONTEXT, "vm": "web2"}),
        line(context={**CONTEXT, "uuid": "x"}),
    ],
)
def test_naming_a_vm_drops_the_message(raw: bytes) -> None:
    assert reason(raw) == "named_vm"


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b"\xff\xfe",
        line(seq="7"),
        line(seq=-1),
        line(seq=True),
        line(seq=2**64),
        line(kind="hello"),
        line(sent_at="now"),
        line(sent_at=float("nan")),
        line(context=[]),
        line(context={**CONTEXT, "users": "alice"}),
        line(context={**CONTEXT, "users": ["bad name"]}),
        line(context={**CONTEXT, "apps": {"pg": ["any"]}}),
        line(context={**CONTEXT, "apps": {"pg": ["tcp/0"]}}),
        line(context={**CONTEXT, "apps": {"pg": "tcp/5432"}}),
        line(context={**CONTEXT, "os": ""}),
        line(context={**CONTEXT, "posture": {"disk": "maybe"}}),
        line(context={**CONTEXT, "labels": [1]}),
        line(context={**CONTEXT, "users": [f"u{i}" for i in range(300)]}),
    ],
)
def test_malformed(raw: bytes) -> None:
    assert reason(raw) == "malformed"


def test_api_body_clamps_a_future_guest_clock() -> None:
    body = messages.api_body({"users": []}, sent_at=2000.0, now=1000.0, ttl=15)
    assert body == {"users": [], "observed_at": 1000.0, "ttl_seconds": 15}
    assert messages.api_body({}, sent_at=990.0, now=1000.0, ttl=15)["observed_at"] == 990.0


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=5, burst=10)
    assert sum(bucket.take(100.0) for _ in range(30)) == 10
    assert not bucket.take(100.1)
    assert bucket.take(100.2)  # one token back after 0.2 s at 5/s
    assert sum(bucket.take(200.0) for _ in range(30)) == 10  # never more than the burst saved
