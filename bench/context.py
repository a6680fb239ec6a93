"""bench/context: latency from a login in a guest to the grant being on the bridge.

    sudo .venv/bin/python -m bench.context [--quick] [--reps N] [--out docs/benchmarks.md] [--no-write]

The setup of tests/ovs/test_living_context.py, really running: a private OvsSandbox with two
netdev bridges (hv1, hv2), the finance-identity example's VMs as network namespaces,
`goldilocks run` in the sandbox's namespace, one `python -m agent.relay` per hypervisor and one
`python -m agent.guest` per VM (interval 0.2 s, heartbeat 1 s, relay ttl 4 s).

Each repetition: alice's USER_PROCESS record is written into fin-desk2's utmp (bob stays logged
in; alice is what makes fin-desk2 a member of `finance-desktops`, the source of the
`finance-to-ledger` tcp/5432 allow), then

- login → flows: until both bridges hold exactly the flows of the logged-in state (the flows
  that differ between the two states, learnt in a warm-up login/logout, are all present and
  none of the logged-out-only flows remain; `ovs-ofctl dump-flows` polled);
- login → TCP ok: until a TCP connect fin-desk2 → ledger-db:5432 succeeds (a prober inside
  fin-desk2 retries a connect with a 20 ms timeout);

then the record turns DEAD_PROCESS and

- logout → flows: until both bridges are back to the logged-out flows;
- logout → TCP refused: until a new connect fails again (confirmed by a 0.5 s attempt).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from tests.ovs.harness import OvsSandbox, _Lines, _terminate, tcp_server, unavailable_reason
from tests.ovs.test_controller import Lab, build_lab, vm_ip, wait_for
from tests.ovs.test_living_context import HEARTBEAT, INTERVAL, TTL, Living, write_users

SECTION = "## bench/context"
DESK, LEDGER, PORT = "fin-desk2", "ledger-db", 5432
WAIT = 30.0  # seconds: a repetition that takes longer than this fails the run

_PROBER = """
import socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
def works(timeout=0.02):
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()
print("ready", flush=True)
for line in sys.stdin:
    want, limit = line.split()
    want, deadline = want == "ok", time.time() + float(limit)
    at = None
    while time.time() < deadline:
        t = time.time()
        if want and works():
            at = time.time()
            break
        # A refusal counts once confirmed: a first packet through the datapath's slow path
        # can take longer than 20 ms on a busy machine.
        if not want and not works() and not works(0.5):
            at = t
            break
        if not want:
            time.sleep(0.01)
    print(at if at is not None else "timeout", flush=True)
"""


@contextlib.contextmanager
def sandbox_lab(tmp: Path) -> Iterator[Lab]:
    """The `lab` fixture of tests/ovs/test_controller.py outside pytest: sandbox, bridges, VMs."""
    ovs = OvsSandbox().start()
    lab: Lab | None = None
    try:
        checkpoint = ovs.checkpoint()
        try:
            lab = build_lab(ovs, ovs.add_bridge, tmp)
            yield lab
        finally:
            if lab is not None and lab.proc is not None and lab.proc.poll() is None:
                lab.proc.kill()
                lab.proc.wait(timeout=10)
            ovs.rollback(checkpoint)
    finally:
        ovs.stop()


def flows(lab: Lab) -> frozenset[str]:
    return frozenset(f"{hv}: {line}" for hv in lab.bridges for line in lab.installed(hv))


def settled(lab: Lab, quiet: float = 1.5) -> frozenset[str]:
    """The flows once they stop changing for `quiet` seconds."""
    last, since = flows(lab), time.monotonic()
    deadline = since + WAIT
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = flows(lab)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError("the bridges did not settle")


class Prober:
    """A TCP prober inside the desktop's namespace: `start(want)` then `result()` → epoch or None."""

    def __init__(self, lab: Lab) -> None:
        self.proc = lab.ovs.vms[DESK].popen([sys.executable, "-u", "-c", _PROBER, vm_ip(lab, LEDGER), str(PORT)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT)
        self.lines = _Lines(self.proc.stdout)
        assert self.lines.readline(10) == "ready"

    def start(self, want_ok: bool) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{'ok' if want_ok else 'fail'} {WAIT}\n".encode())
        self.proc.stdin.flush()

    def result(self) -> float | None:
        line = self.lines.readline(WAIT + 10)
        return None if line in (None, "timeout") else float(line)

    def close(self) -> None:
        _terminate(self.proc)


def wait_flows(lab: Lab, present: frozenset[str], absent: frozenset[str]) -> float:
    """Epoch when the bridges first hold every `present` flow and none of `absent`."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        now = flows(lab)
        at = time.time()
        if present <= now and not (absent & now):
            return at
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the flows")


def measure(lab: Lab, living: Living, reps: int, log=print) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    utmp = living.utmp(DESK)
    prober = Prober(lab)
    try:
        out = settled(lab)
        # Warm-up: learn which flows alice's login adds and removes.
        write_users(utmp, ["bob", "alice"])
        prober.start(True)
        assert prober.result() is not None, "warm-up login: TCP never worked"
        into = settled(lab)
        write_users(utmp, ["bob"], dead=["alice"])
        prober.start(False)
        assert prober.result() is not None, "warm-up logout: TCP kept working"
        back = settled(lab)
        assert back == out, "the logged-out flows differ after a login/logout round"
        added, removed = into - out, out - into
        assert added, "alice's login changed no flow"
        log(f"login adds {len(added)} flows and removes {len(removed)} (over both bridges)")
        results: dict[str, list[float]] = {"login → flows": [], "login → TCP ok": [],
                                           "logout → flows": [], "logout → TCP refused": []}
        for i in range(reps):
            time.sleep(0.3 + (i % 5) * 0.037)  # do not phase-lock with the agent's 0.2 s observation loop
            t0 = time.time()
            write_users(utmp, ["bob", "alice"])
            prober.start(True)
            t_flows = wait_flows(lab, added, removed)
            t_tcp = prober.result()
            assert t_tcp is not None, f"rep {i}: TCP never worked after the login"
            results["login → flows"].append(t_flows - t0)
            results["login → TCP ok"].append(t_tcp - t0)
            time.sleep(0.3 + (i % 3) * 0.041)
            t1 = time.time()
            write_users(utmp, ["bob"], dead=["alice"])
            prober.start(False)
            t_flows = wait_flows(lab, removed, added)
            t_tcp = prober.result()
            assert t_tcp is not None, f"rep {i}: TCP kept working after the logout"
            results["logout → flows"].append(t_flows - t1)
            results["logout → TCP refused"].append(t_tcp - t1)
            log(f"rep {i + 1}/{reps}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in results.items()))
        return results
    finally:
        prober.close()


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default) of the sorted values."""
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def machine_info() -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ovs = subprocess.run(["ovs-vswitchd", "--version"], capture_output=True, text=True, check=False).stdout
    return [f"- Date: {datetime.now(UTC).strftime('%a %b %d %H:%M:%S UTC %Y')}",
            f"- CPU: {cpu}, {os.cpu_count()} cores",
            f"- Kernel: {platform.release()}",
            f"- Python: {platform.python_version()} ({platform.python_implementation()})",
            f"- OVS: {(ovs.splitlines() or ['unknown'])[0].strip()}"]


def render(results: dict[str, list[float]], reps: int, quick: bool) -> str:
    lines = [SECTION, "",
             ("Login latency, end to end on a real Open vSwitch (`python -m bench.context`; see bench/README.md): "
              "the finance-identity example in a private OvsSandbox (two netdev bridges, VMs as network namespaces), "
              "`goldilocks run`, one relay per hypervisor and one guest agent per VM, all real processes. A login is "
              f"alice's USER_PROCESS record written into {DESK}'s utmp (a logout: the record turned DEAD_PROCESS); "
              f"it makes {DESK} a member of `finance-desktops`, the source of the `finance-to-ledger` tcp/5432 "
              f"allow. Agent interval {INTERVAL:g} s (heartbeat {HEARTBEAT:g} s), relay ttl {TTL} s."
              + (" **Quick run.**" if quick else "")),
             "", *machine_info(), "",
             "| from → until | p50 (ms) | p99 (ms) | max (ms) | min (ms) | n |", "|---|---|---|---|---|---|"]
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        lines.append(f"| {name} | {statistics.median(ms):.0f} | {percentile(ms, 99):.0f} | {max(ms):.0f} "
                     f"| {min(ms):.0f} | {len(ms)} |")
    lines += ["", ("Clock starts when the test has rewritten the utmp file. *flows*: until `ovs-ofctl dump-flows` of "
              "both bridges shows every flow the login adds and none it removes (or the reverse), learnt in a "
              "warm-up round; polled back to back, so resolution is one dump of both bridges (~10–30 ms). *TCP*: a "
              f"prober in {DESK}'s namespace retries connect() to ledger-db:5432 with a 20 ms timeout (a refusal counts "
              "from the first failed attempt once a 0.5 s attempt right after it fails too); it can see the grant "
              "before the flow poll does, whose resolution is coarser. The path "
              f"includes the agent's observation interval ({INTERVAL:g} s: a login waits 0–{INTERVAL * 1000:.0f} ms "
              "to be seen), the relay's checks and HTTP forward, the API's store write, the engine's recompute and "
              "the OpenFlow bundle. p99 over this few repetitions is close to the max."), ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the `## bench/context` section of `path` (append it if missing)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
                        + lines[end:]) + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.context", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 repetitions")
    p.add_argument("--reps", type=int, help="repetitions (default 30; --quick 5)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="only print the section")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 30)
    why = unavailable_reason()
    if why:
        print(f"bench.context: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gl-bench-context-") as tmp, sandbox_lab(Path(tmp)) as lab:
        lab.start()
        lab.converged()
        living = Living(lab)
        try:
            living.start()
            with tcp_server(lab.ovs.vms[LEDGER], PORT):
                results = measure(lab, living, reps, log=lambda s: print(s, file=sys.stderr, flush=True))
        finally:
            living.stop()
        wait_for("the controller to still run", lambda: lab.proc is not None and lab.proc.poll() is None, timeout=1)
    section = render(results, reps, args.quick)
    if not args.no_write:
        write_section(args.out, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
