"""vsock: the peer CID, from the hypervisor's records, names the VM; the guest cannot."""

from __future__ import annotations

import random
import socket
import time
import uuid
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_channel
from agent.relay import Relay, RelayConfig
from tests.agent.support import Proc, wait_for

VM = str(uuid.uuid4())
PORT = random.randint(20000, 60000)


def test_channel_addresses() -> None:
    assert str(parse_channel("vsock:2:7070")) == "vsock:2:7070"
    assert parse_channel("unix:/run/x.sock").path == "/run/x.sock"
    for bad in ("vsock:two:7070", "tcp:1.2.3.4:5", "unix:", "vsock:2"):
        with pytest.raises(ConfigError):
            parse_channel(bad)


def test_peer_cid_names_the_vm() -> None:
    relay = Relay(RelayConfig(hypervisor="hv1", api="http://127.0.0.1:9", token="t", vsock={3: VM}))
    state = relay._by_cid((3, 1234))
    assert state is not None and state.vm == VM
    assert relay._by_cid((4, 1234)) is None and relay.unknown_peers == 1


def vsock_bindable() -> bool:
    if not hasattr(socket, "AF_VSOCK"):
        return False
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:
            probe.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not vsock_bindable(), reason="no AF_VSOCK transport on this machine")
def test_relay_listens_on_vsock_and_agent_keeps_trying(workdir: Path) -> None:
    (workdir / "token").write_text("t")
    relay = Proc(
        "agent.relay",
        {
            "hypervisor": "hv1",
            "api": "http://127.0.0.1:9",
            "token_file": str(workdir / "token"),
            "vsock": {3: VM},
            "vsock_port": PORT,
            "status_file": str(workdir / "st.json"),
            "status_interval": 0.1,
        },
        workdir,
        "relay",
    )
    agent = Proc(
        "agent.guest",
        {"channel": f"vsock:2:{PORT}", "interval": 0.1, "utmp": str(workdir / "u")},
        workdir,
        "agent",
    )
    try:
        relay.start()
        wait_for("relay up", lambda: (workdir / "st.json").exists())
        agent.start()
        time.sleep(1.5)  # no host CID 2 here (we are not in a VM): the agent must keep retrying
        assert agent.alive and relay.alive
        assert agent.terminate() == 0 and relay.terminate() == 0
    finally:
        agent.kill()
        relay.kill()
