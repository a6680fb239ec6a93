"""The controller process on real OVS: two netdev bridges stand in for two hypervisors, VMs are
network namespaces on veth ports carrying libvirt-style external_ids, and `goldilocks run` is
started by the test as a user would start it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from controller.engine import Engine
from controller.flows.render import render_flows
from controller.policy.explain import explain
from controller.scenario import Scenario, load_scenario
from fleet.control import free_port, wait_for
from tests.ovs.harness import OvsSandbox, VmPort, ping, tcp_connect, tcp_server
from tests.support import make_pki

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finance-identity.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "malformed"
GOLDILOCKS = [sys.executable, "-m", "controller.cli"]
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


@dataclass
class Lab:
    ovs: OvsSandbox
    scenario: Scenario
    bridges: dict[str, str]
    uplinks: dict[str, str]
    tmp: Path
    port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    tls: dict[str, str] | None = None
    apps: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    def config(self) -> Path:
        path = self.tmp / "goldilocks.yaml"
        path.write_text(yaml.safe_dump({
            "scenario": str(EXAMPLE),
            "openflow": {"listen": "127.0.0.1", "port": self.port, **({"tls": self.tls} if self.tls else {})},
            "apps": self.apps,
            "database": f"sqlite:///{self.tmp / 'goldilocks.db'}",
            "api": {"listen": "127.0.0.1", "port": self.api_port},
            "hypervisors": {hv: {"ovsdb": f"unix:{self.ovs.dir}/db.sock", "bridge": br, "uplinks": [self.uplinks[hv]]}
                            for hv, br in self.bridges.items()},
            "log_level": "INFO",
        }))
        return path

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.tmp / f"controller-{self.starts}.log"
        log = open(self.log_path, "wb")
        # ovs-vswitchd lives in the sandbox's network namespace: so does its controller.
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ovs.netns, *GOLDILOCKS, "run",
                                      "--config", str(self.config())], cwd=ROOT,
                                     env={**os.environ, "GOLDILOCKS_ADMIN_TOKEN": ADMIN_TOKEN},
                                     stdout=log, stderr=subprocess.STDOUT)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The goldilocks command, as an operator on the controller's host runs it."""
        return subprocess.run(["ip", "netns", "exec", self.ovs.netns, *GOLDILOCKS, *args,
                               "--api", f"http://127.0.0.1:{self.api_port}", "--token", ADMIN_TOKEN],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def expected(self, scenario: Scenario | None = None) -> dict[str, frozenset]:
        sc = scenario or self.scenario
        engine = Engine(sc.inventory, sc.directory, sc.policy, sc.groups)
        return {hv: engine.desired(hv) for hv in self.bridges}

    def normalized(self, flows: frozenset) -> list[str]:
        """What OVS shows for these flows: load them into a scratch bridge and dump it."""
        scratch = "glscratch"
        if scratch not in self.ovs.bridges:
            self.ovs.add_bridge(scratch)
        self.ovs.replace_flows(scratch, render_flows(flows))
        return sorted(self.ovs.dump_flows(scratch))

    def installed(self, hv: str) -> list[str]:
        return sorted(self.ovs.dump_flows(self.bridges[hv]))

    def converged(self, expected: dict[str, frozenset] | None = None) -> None:
        want = {hv: self.normalized(f) for hv, f in (expected or self.expected()).items()}
        wait_for("bridges to hold exactly the desired flows", lambda: all(self.installed(hv) == want[hv] for hv in want))


def build_lab(ovs: OvsSandbox, make_bridge: Callable[..., str], tmp: Path) -> Lab:
    """Two hypervisor bridges joined by an uplink, every example VM plugged, controller targets set."""
    sc = load_scenario(EXAMPLE)
    bridges = {hv.name: make_bridge(f"gl{hv.name}", dpid=hv.dpid) for hv in sc.inventory.hypervisors.values()}
    link = ovs.add_patch_or_veth_link(bridges["hv1"], 100, bridges["hv2"], 100)
    lab = Lab(ovs, sc, bridges, {"hv1": link.port_a, "hv2": link.port_b}, tmp)
    for vm in sc.inventory.vms.values():
        plug(lab, vm.name, vm.hypervisor, vm.name)
    for br in bridges.values():
        ovs.vsctl("set-controller", br, f"tcp:127.0.0.1:{lab.port}", "--", "set", "Controller", br,
                  "connection-mode=out-of-band")
    return lab


@pytest.fixture
def lab(ovs: OvsSandbox, bridge_factory, tmp_path: Path) -> Iterator[Lab]:
    lab = build_lab(ovs, bridge_factory, tmp_path)
    yield lab
    if lab.proc is not None and lab.proc.poll() is None:
        lab.proc.kill()
        lab.proc.wait(timeout=10)
    if "glscratch" in ovs.bridges:
        ovs.del_bridge("glscratch")


def plug(lab: Lab, vm_name: str, hv: str, port_name: str, ofport: int | None = None) -> VmPort:
    vm = lab.scenario.inventory.vm_by_name(vm_name)
    assert vm is not None
    nic = vm.vnics[0]
    return lab.ovs.add_vm_port(lab.bridges[hv], port_name[:15], mac=nic.mac, ip=f"{nic.ips[0]}/24",
                               ofport=ofport or nic.ofport,
                               external_ids={"iface-id": f"{vm.uuid}-{nic.mac}", "attached-mac": nic.mac, "vm-id": vm.uuid})


def vm_ip(lab: Lab, name: str) -> str:
    vm = lab.scenario.inventory.vm_by_name(name)
    assert vm is not None
    return vm.ips[0]


def test_bridges_converge_to_desired_flows_and_enforce_policy(lab: Lab) -> None:
    lab.start()
    lab.converged()
    world = Engine(lab.scenario.inventory, lab.scenario.directory, lab.scenario.policy, lab.scenario.groups).world()
    vms = {vm.name: vm for vm in world.inventory.vms.values()}
    ledger = lab.ovs.vms["ledger-db"]
    with tcp_server(ledger, 5432):
        for src in ("fin-desk1", "fin-desk2", "eng-desk1"):
            want = explain(world, lab.scenario.groups, vms[src], vms["ledger-db"], "tcp", 5432).allowed
            assert tcp_connect(lab.ovs.vms[src], vm_ip(lab, "ledger-db"), 5432, timeout=1.5) == want, src
            want = explain(world, lab.scenario.groups, vms[src], vms["ledger-db"], "icmp", 0).allowed
            assert ping(lab.ovs.vms[src], vm_ip(lab, "ledger-db")) == want, src
    assert not ping(lab.ovs.vms["fin-desk1"], vm_ip(lab, "fin-desk2"))
    # Flows Goldilocks did not install are left alone.
    for br in lab.bridges.values():
        assert any("cookie=0x601d" in line for line in lab.ovs.dump_flows(br))


def test_foreign_flows_survive_and_unknown_switch_changes_nothing(lab: Lab) -> None:
    foreign = "table=200,priority=7,cookie=0x1234,ip,nw_dst=192.0.2.1 actions=drop"
    lab.ovs.add_flows(lab.bridges["hv1"], foreign)
    lab.start()
    want = lab.normalized(lab.expected()["hv1"])
    wait_for("hv1 converged", lambda: [l for l in lab.installed("hv1") if "cookie=0x1234" not in l] == want)
    assert any("cookie=0x1234" in line for line in lab.installed("hv1")), "a foreign flow was deleted"


def test_new_vm_on_a_reused_ofport_gets_only_its_own_policy(lab: Lab) -> None:
    lab.start()
    lab.converged()
    ledger_ip = vm_ip(lab, "ledger-db")
    with tcp_server(lab.ovs.vms["ledger-db"], 5432):
        assert tcp_connect(lab.ovs.vms["fin-desk1"], ledger_ip, 5432)
        old_ofport = lab.scenario.inventory.vm_by_name("fin-desk1").vnics[0].ofport
        lab.ovs.del_vm_port("fin-desk1")
        lab.ovs.del_vm_port("eng-desk1")  # eng-desk1 moves to hv1 and lands on fin-desk1's old port
        newcomer = plug(lab, "eng-desk1", "hv1", "eng-desk1", ofport=old_ofport)
        expected = moved_expected(lab, {"fin-desk1": None, "eng-desk1": ("hv1", old_ofport)})
        lab.converged(expected)
        assert not tcp_connect(newcomer, ledger_ip, 5432, timeout=1.0), "the newcomer inherited fin-desk1's grant"
        assert ping(newcomer, ledger_ip), "the newcomer keeps its own (desktop) access"


def moved_expected(lab: Lab, moves: dict[str, tuple[str, int] | None]) -> dict[str, frozenset]:
    """Expected flows after VMs are unplugged (None) or plugged elsewhere."""
    return lab.expected(moved_scenario(lab, moves))


def moved_scenario(lab: Lab, moves: dict[str, tuple[str, int] | None]) -> Scenario:
    """The scenario after VMs are unplugged (None) or plugged elsewhere (hypervisor, ofport)."""
    from dataclasses import replace as _replace

    from controller.model import Inventory

    inv = lab.scenario.inventory
    vms = dict(inv.vms)
    for name, where in moves.items():
        vm = inv.vm_by_name(name)
        if where is None:
            vms[vm.uuid] = _replace(vm, vnics=tuple(_replace(n, ofport=None) for n in vm.vnics))
        else:
            hv, ofport = where
            vms[vm.uuid] = _replace(vm, hypervisor=hv, vnics=(_replace(vm.vnics[0], ofport=ofport),))
    return _replace(lab.scenario, inventory=Inventory(inv.hypervisors, vms, inv.gateway))


def test_a_bundle_the_switch_rejects_changes_nothing_and_is_retried(lab: Lab) -> None:
    lab.start()
    lab.converged()
    br = lab.bridges["hv1"]
    count0 = sum(1 for l in lab.ovs.dump_flows(br) if "table=0," in l.replace(" ", ""))
    lab.ovs.vsctl("--", "--id=@ft", "create", "Flow_Table", f"flow_limit={count0}", "overflow_policy=refuse",
                  "--", "set", "Bridge", br, "flow_tables:0=@ft")
    before = lab.installed("hv1")
    # eng-desk1 moves to hv1: hv1's classifier needs more flows than table 0 may hold.
    lab.ovs.del_vm_port("eng-desk1")
    plug(lab, "eng-desk1", "hv1", "eng-desk1", ofport=7)
    expected = moved_expected(lab, {"eng-desk1": ("hv1", 7)})
    wait_for("the rejected bundle to be reported", lambda: "bundle" in lab.log() and "failed" in lab.log(), timeout=20)
    assert lab.installed("hv1") == before, "a failed bundle changed the table"
    want2 = lab.normalized(expected["hv2"])
    wait_for("hv2 to converge regardless", lambda: lab.installed("hv2") == want2)
    assert "switch refused add of flow table=0" in lab.log(), "the error names the refused flow"
    lab.ovs.vsctl("clear", "Bridge", br, "flow_tables")
    lab.converged(expected)


SEND_AND_WAIT_CLOSE = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
start = time.monotonic()
try:
    s.sendall(bytes.fromhex("0500000800000001"))  # our OF1.4 hello first
    s.sendall(bytes.fromhex(sys.argv[2]))
except (ConnectionResetError, BrokenPipeError):  # closed before we finished sending
    print(f"closed (reset) after {time.monotonic() - start:.2f} s"); sys.exit(0)
s.settimeout(1)
while time.monotonic() - start < 8:
    try:
        if not s.recv(65536):
            print(f"closed after {time.monotonic() - start:.2f} s"); sys.exit(0)
    except socket.timeout:
        continue
    except ConnectionResetError:
        print(f"closed (reset) after {time.monotonic() - start:.2f} s"); sys.exit(0)
print("still open after 8 s")
"""


def test_malformed_openflow_messages_do_not_hang_the_controller(lab: Lab) -> None:
    lab.start()
    lab.converged()
    payloads = sorted(FIXTURES.glob("*.hex"))
    assert payloads, "the malformed-message fixtures are missing"
    for path in payloads:
        hexes = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
        proc = subprocess.run(["ip", "netns", "exec", lab.ovs.netns, sys.executable, "-c", SEND_AND_WAIT_CLOSE,
                               str(lab.port), "".join(hexes)], capture_output=True, text=True, timeout=60)
        assert proc.stdout.startswith("closed"), f"{path.name}: the controller did not close the connection: {proc.stdout}{proc.stderr}"
        assert lab.proc is not None and lab.proc.poll() is None, f"{path.name}: the controller died"
    # The controller still manages its switches: a change still reaches the bridges.
    lab.ovs.del_vm_port("fin-desk2")
    lab.converged(moved_expected(lab, {"fin-desk2": None}))


def test_sigterm_stops_cleanly_and_leaves_the_flows(lab: Lab) -> None:
    lab.start()
    lab.converged()
    before = {hv: lab.installed(hv) for hv in lab.bridges}
    assert lab.proc is not None
    lab.proc.send_signal(signal.SIGTERM)
    assert lab.proc.wait(timeout=15) == 0
    assert {hv: lab.installed(hv) for hv in lab.bridges} == before
    assert ping(lab.ovs.vms["fin-desk1"], vm_ip(lab, "ledger-db"))
    assert os.path.exists(lab.log_path)


def test_openflow13_switches_get_bundles_through_the_onf_extension(lab: Lab) -> None:
    for br in lab.bridges.values():
        lab.ovs.vsctl("set", "Bridge", br, "protocols=OpenFlow13")
    lab.start()
    want = {hv: len(f) for hv, f in lab.expected().items()}

    def count13(hv: str) -> int:
        out = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "--no-stats", "dump-flows",
                              f"unix:{lab.ovs.dir}/{lab.bridges[hv]}.mgmt"], env=lab.ovs.env,
                             capture_output=True, text=True).stdout
        return sum(1 for line in out.splitlines() if "actions=" in line)

    wait_for("OpenFlow 1.3 bridges to fill", lambda: all(count13(hv) == n for hv, n in want.items()))
    assert "(OpenFlow 0x04)" in lab.log() and "(OpenFlow 0x05)" not in lab.log()
    # Back to 1.4: the reconnect finds exactly the desired flows and changes nothing.
    for br in lab.bridges.values():
        lab.ovs.vsctl("set", "Bridge", br, "protocols=OpenFlow13,OpenFlow14")
    wait_for("reconnect over OpenFlow 1.4", lambda: "(OpenFlow 0x05)" in lab.log())
    lab.converged()
    wait_for("both bridges in sync again", lambda: lab.log().count("in sync") >= 4)
    assert "bundle 3" not in lab.log(), "the reconnect sent flow mods for flows installed over 1.3"


def test_extra_os_ken_apps_named_in_the_config_are_loaded(lab: Lab) -> None:
    lab.apps = ["os_ken.app.ofctl.service"]
    lab.start()
    lab.converged()
    assert "instantiating app os_ken.app.ofctl.service" in lab.log()


TLS_HANDSHAKE = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(sys.argv[2])
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(bytes.fromhex("0500000800000001"))
            data = s.recv(8)
            print("accepted" if data else "closed")
except (ssl.SSLError, ConnectionError, OSError) as exc:
    print("refused", type(exc).__name__)
"""


def test_tls_listener_verifies_switch_certificates(lab: Lab) -> None:
    pki = make_pki(lab.tmp)
    lab.tls = {"key": str(pki["controller.key"]), "cert": str(pki["controller.crt"]), "ca": str(pki["ca.crt"])}
    lab.ovs.vsctl("set-ssl", str(pki["switch.key"]), str(pki["switch.crt"]), str(pki["ca.crt"]))
    for br in lab.bridges.values():
        lab.ovs.vsctl("set-controller", br, f"ssl:127.0.0.1:{lab.port}")
    lab.start()
    lab.converged()
    for who, expect in (("switch", "accepted"), ("rogue", "refused")):
        proc = subprocess.run(["ip", "netns", "exec", lab.ovs.netns, sys.executable, "-c", TLS_HANDSHAKE, str(lab.port),
                               str(pki["ca.crt"]), str(pki[f"{who}.crt"]), str(pki[f"{who}.key"])],
                              capture_output=True, text=True, timeout=30)
        assert proc.stdout.startswith(expect), f"{who}: {proc.stdout}{proc.stderr}"
    # A plain-TCP peer gets nothing either.
    plain = subprocess.run(["ip", "netns", "exec", lab.ovs.netns, sys.executable, "-c", SEND_AND_WAIT_CLOSE,
                            str(lab.port), "0500000800000002"], capture_output=True, text=True, timeout=30)
    assert plain.stdout.startswith("closed"), plain.stdout


def watch_flow_changes(lab: Lab) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["ovs-ofctl", "-O", "OpenFlow14", "monitor", f"unix:{lab.ovs.dir}/{br}.mgmt", "watch:"],
                             env=lab.ovs.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for br in lab.bridges.values()]


def flow_changes(monitors: list[subprocess.Popen[bytes]]) -> list[str]:
    for m in monitors:
        m.terminate()
    return [line for m in monitors for line in m.communicate(timeout=10)[0].decode().splitlines()
            if "event=" in line and "event=INITIAL" not in line]


def expected_with(lab: Lab, document: dict) -> dict[str, frozenset]:
    from dataclasses import replace as _replace

    from controller.boot import parse_document

    policy, groups, problems = parse_document(document)
    assert policy is not None, problems
    return lab.expected(_replace(lab.scenario, policy=policy, groups=groups))


def test_publish_through_the_api_reaches_the_switches_and_survives_a_restart(lab: Lab) -> None:
    from controller.boot import policy_document_of

    lab.start()
    lab.converged()
    wait_for("the API", lambda: lab.cli("policy", "show").returncode == 0)
    document = policy_document_of(EXAMPLE)
    document["rules"] = [r for r in document["rules"] if r["id"] != "finance-to-ledger"]
    draft = lab.tmp / "draft.yaml"
    draft.write_text(yaml.safe_dump(document))
    applied = lab.cli("policy", "apply", str(draft), "--comment", "ledger closed for audit")
    assert applied.returncode == 0, applied.stderr
    whatif = lab.cli("whatif")
    assert whatif.returncode == 0 and "fin-desk1 -> ledger-db tcp/5432: allow -> deny" in whatif.stdout, whatif.stdout
    lab.converged()  # a draft touches no switch
    published = lab.cli("policy", "publish")
    assert published.returncode == 0 and "published revision 2" in published.stdout, published.stdout + published.stderr
    lab.converged(expected_with(lab, document))

    # A publish the store refuses leaves every flow table byte-identical.
    before = {hv: lab.installed(hv) for hv in lab.bridges}
    bad = dict(document, rules=document["rules"] + [{"id": "oops", "tier": "application", "position": 99,
                                                    "source": {"cidr": "10.0.0.1/8"}, "destination": {"group": "nope"},
                                                    "services": ["tcp/70000"], "action": "allow"}])
    draft.write_text(yaml.safe_dump(bad))
    assert lab.cli("policy", "apply", str(draft)).returncode == 0
    refused = lab.cli("policy", "publish")
    assert refused.returncode == 1
    for needle in ("host bits", "unknown group 'nope'", "70000"):
        assert needle in refused.stderr, refused.stderr
    time.sleep(1.0)
    assert {hv: lab.installed(hv) for hv in lab.bridges} == before
    assert lab.cli("policy", "discard").returncode == 0

    # A restart loads revision 2 from the database and changes nothing on the switches.
    monitors = watch_flow_changes(lab)
    assert lab.proc is not None
    lab.proc.send_signal(signal.SIGTERM)
    assert lab.proc.wait(timeout=15) == 0
    lab.start()
    wait_for("both bridges in sync after the restart", lambda: lab.log().count("in sync") >= 2)
    time.sleep(0.5)
    assert flow_changes(monitors) == [], "the restart changed flows"
    lab.converged(expected_with(lab, document))

    # Every change is in the audit log with its author; the refusal too.
    audit = lab.cli("audit")
    assert audit.returncode == 0, audit.stderr
    assert "policy.publish" in audit.stdout and "admin" in audit.stdout and "rejected" in audit.stdout


def test_status_and_rule_hit_counts_come_from_the_switches(lab: Lab) -> None:
    lab.start()
    lab.converged()
    wait_for("the API", lambda: lab.cli("status").returncode == 0)
    status = lab.cli("status").stdout
    for hv in lab.bridges:
        row = next(line for line in status.splitlines() if line.startswith(hv))
        assert " yes " in row and "in_sync" in row, row
    for _ in range(3):
        assert ping(lab.ovs.vms["fin-desk2"], vm_ip(lab, "ledger-db"))

    def counted() -> bool:
        out = lab.cli("status").stdout
        row = next((line for line in out.splitlines() if line.startswith("desktops-ping-ledger")), "")
        return bool(row) and int(row.split()[1]) > 0 and "never" not in row

    wait_for("ping hits on the rule that allows them (counters are read every 10 s)", counted, timeout=40, every=1)
    out = lab.cli("status").stdout
    denied = next(line for line in out.splitlines() if line.startswith("finance-to-ledger"))
    assert denied.split()[1] == "0", "no traffic matched the finance rule"



def with_rule(document: dict, port: int) -> dict:
    """The document with one more rule like finance-to-ledger, on tcp/`port`."""
    rule = next(r for r in document["rules"] if r["id"] == "finance-to-ledger")
    extra = dict(rule, id=f"finance-to-ledger-{port}", position=15, services=[f"tcp/{port}"])
    return dict(document, rules=[*document["rules"], extra])


def publish(lab: Lab, document: dict) -> subprocess.CompletedProcess[str]:
    draft = lab.tmp / "draft.yaml"
    draft.write_text(yaml.safe_dump(document))
    assert lab.cli("policy", "apply", str(draft)).returncode == 0
    return lab.cli("policy", "publish")


def without_ct(lab: Lab) -> None:
    """A datapath without connection tracking, for the netdev backer both bridges share."""
    lab.ovs.appctl("dpif/set-dp-features", lab.bridges["hv1"], "ct_state", "false")


def with_ct(lab: Lab) -> None:
    lab.ovs.appctl("dpif/set-dp-features", lab.bridges["hv1"], "ct_state", "true")


def test_a_bundle_with_adds_the_switch_refuses_is_discarded_whole_and_retried(lab: Lab) -> None:
    """Open vSwitch checks each add as it joins a bundle and would commit the others without the
    ones it refuses; the controller stages the adds, sees the refusal and discards the bundle.
    The refusal is OVS's own: a datapath without connection tracking (an older kernel module;
    OVS probes a datapath's features when it starts, so the switch lacks it from the first
    message of the controller's connection), checked per add. A new rule's conj_id flows
    match ct_state and are refused; its clause flows do not and are accepted."""
    from controller.boot import policy_document_of

    lab.start()
    lab.converged()
    wait_for("the API", lambda: lab.cli("policy", "show").returncode == 0)
    before = {hv: lab.installed(hv) for hv in lab.bridges}
    without_ct(lab)
    try:
        lab.kill9()
        lab.start()  # a new connection: nothing this switch accepts is known yet
        wait_for("the restarted controller in sync", lambda: lab.log().count(" in sync") >= 2)
        document = with_rule(policy_document_of(EXAMPLE), 9999)
        published = publish(lab, document)
        assert published.returncode == 0, published.stdout + published.stderr
        retries = [f"bridge of hv1 out of sync, retry in {delay} s" for delay in ("0.5", "1.0", "2.0")]
        wait_for("three failed attempts, backing off", lambda: all(r in lab.log() for r in retries), timeout=30)
        assert {hv: lab.installed(hv) for hv in lab.bridges} == before, "a bundle with a refused add changed a table"
        refused = [line for line in lab.log().splitlines() if "switch refused add of flow table=12" in line]
        assert refused and "finance-to-ledger-9999" in refused[0], "the error names the refused flow and its rule"
        assert "NXBMC_CT_DATAPATH_SUPPORT" in refused[0], refused[0]
        assert "error OFPET_" not in lab.log(), "the switch refused the discard (or another message)"
        assert "(one phase)" not in lab.log()
        status = lab.cli("status").stdout
        assert "in_sync" not in next(line for line in status.splitlines() if line.startswith("hv1")), status
    finally:
        with_ct(lab)
    lab.converged(expected_with(lab, document))


def test_bundles_of_shapes_the_switch_took_go_in_one_phase_and_a_refusal_makes_it_read_again(lab: Lab) -> None:
    """Once a switch has taken flows of a shape on this connection, a bundle of known shapes
    goes in one phase (open, adds, commit together). A switch only loses a datapath feature on a
    live connection by an operator's command (simulated here): the one-phase bundle is then
    partly refused, the controller says so, reads the table again and retries in two phases,
    discarded while the feature is off; it converges once the feature is back."""
    from controller.boot import policy_document_of

    lab.start()
    lab.converged()
    wait_for("the API", lambda: lab.cli("policy", "show").returncode == 0)
    original = policy_document_of(EXAMPLE)
    assert publish(lab, with_rule(original, 9999)).returncode == 0
    lab.converged(expected_with(lab, with_rule(original, 9999)))
    assert "(one phase)" in lab.log(), "a rule like the others is made of shapes the switch took"
    without_ct(lab)
    try:
        assert publish(lab, with_rule(original, 9998)).returncode == 0
        wait_for("the partly refused bundle reported", lambda: "partly refused, the table will be read again" in lab.log())
        wait_for("a retry in two phases, discarded", lambda: "failed, table left as it was" in lab.log(), timeout=30)
    finally:
        with_ct(lab)
    lab.converged(expected_with(lab, with_rule(original, 9998)))


def test_an_unplugged_ports_conntrack_zone_is_flushed(lab: Lab) -> None:
    """A port's connections are forgotten with it, so whatever gets its number next inherits no
    established connection (Open vSwitch must accept the controller's NXT_CT_FLUSH_ZONE)."""
    lab.start()
    lab.converged()
    zone = lab.scenario.inventory.vm_by_name("fin-desk2").vnics[0].ofport

    def entries() -> list[str]:
        out = lab.ovs.appctl("dpctl/dump-conntrack", f"zone={zone}")
        return [line for line in out.splitlines() if line.strip()]

    assert ping(lab.ovs.vms["fin-desk2"], vm_ip(lab, "ledger-db"))
    assert entries(), "the allowed ping left no conntrack entry in the port's zone"
    lab.ovs.del_vm_port("fin-desk2")
    lab.converged(moved_expected(lab, {"fin-desk2": None}))
    wait_for("the port's zone to be flushed", lambda: not entries(), timeout=5)
    assert "error OFPET_" not in lab.log(), "the switch refused the flush"
