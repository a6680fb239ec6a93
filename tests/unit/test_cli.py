"""The goldilocks command as a user runs it: exit codes, every problem listed, useful output."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("example", ["three-tier.yaml", "finance-identity.yaml"])
def test_check_accepts_the_examples(example: str) -> None:
    code, out, err = run("check", str(EXAMPLES / example))
    assert code == 0 and "valid" in out and not err


def test_check_lists_every_problem_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
hypervisors: [{name: hv1}]
vms:
  - {name: a, hypervisor: hv1, vnics: [{mac: "02:00:00:00:00:01", ips: [10.0.0.1], ofport: 1}]}
groups:
  web: "tag.tier == 'web'"
  who: "usergroup == 'finance'"
policy:
  rules:
    - {id: r1, tier: application, position: 1, source: {group: nope}, destination: any, services: [tcp/70000], action: allow}
    - {id: r1, tier: application, position: 1, source: {cidr: 10.0.0.1/8}, destination: {group: web}, services: [sctp/1], action: allow}
    - {id: r3, tier: application, position: 2, source: {group: who}, destination: {group: web}, action: allow}
""")
    code, out, err = run("check", str(bad))
    assert code == 1 and not out
    for needle in ("unknown group 'nope'", "70000", "host bits", "sctp", "duplicate", "position", "guest"):
        assert needle in err, f"{needle!r} missing from:\n{err}"
    assert err.count("policy.rules[") >= 5


def test_check_names_the_yaml_syntax_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("hypervisors: [\n  {name: hv1\n")
    code, _, err = run("check", str(bad))
    assert code == 1 and "broken.yaml:3:" in err and "YAML syntax error" in err


def test_compile_prints_flows_for_ovs_ofctl() -> None:
    code, out, _ = run("compile", str(EXAMPLES / "three-tier.yaml"), "--hypervisor", "hv1")
    lines = out.splitlines()
    assert code == 0 and len(lines) > 50
    assert all(" actions=" in line and line.startswith("table=") for line in lines)
    assert any("conjunction(" in line for line in lines) and any("ct(commit" in line for line in lines)


def test_compile_stats_and_unknown_hypervisor() -> None:
    code, out, _ = run("compile", str(EXAMPLES / "three-tier.yaml"), "--hypervisor", "hv2", "--stats")
    stats = json.loads(out)
    assert code == 0 and stats["flows"] > stats["policy_flows"] > 0
    code, _, err = run("compile", str(EXAMPLES / "three-tier.yaml"), "--hypervisor", "hv9")
    assert code == 2 and "unknown hypervisor 'hv9'" in err and "hv1, hv2" in err


def test_explain_gives_verdict_rule_and_membership_reasons() -> None:
    f = str(EXAMPLES / "finance-identity.yaml")
    code, out, _ = run("explain", f, "--src", "fin-desk1", "--dst", "ledger-db", "--proto", "tcp", "--port", "5432")
    assert code == 0 and out.startswith("fin-desk1 -> ledger-db tcp/5432: ALLOW")
    assert "finance-to-ledger" in out and "usergroup=finance (guest" in out and "tag.role=desktop (platform" in out
    code, out, _ = run("explain", f, "--src", "fin-desk2", "--dst", "ledger-db", "--proto", "tcp", "--port", "5432")
    assert "DENY" in out.splitlines()[0] and "NOT a member of group 'finance-desktops'" in out
    assert "usergroup=engineering" in out


def test_explain_says_where_the_rules_judge() -> None:
    f = str(EXAMPLES / "three-tier.yaml")
    _, out, _ = run("explain", f, "--src", "web1", "--dst", "app1", "--proto", "tcp", "--port", "8080")
    assert "enforced at egress of web1 (hypervisor hv1, port 1)" in out
    assert "at ingress of app1 (hypervisor hv1, port 2): conntrack only, the same bridge's egress judged it" in out
    _, out, _ = run("explain", f, "--src", "web1", "--dst", "db1", "--proto", "tcp", "--port", "5432")
    assert "enforced at ingress of db1 (hypervisor hv2, port 3)\n" in out


def test_explain_json_and_ip_destination() -> None:
    f = str(EXAMPLES / "three-tier.yaml")
    code, out, _ = run("explain", f, "--src", "admin1", "--dst", "10.0.0.31", "--proto", "tcp", "--port", "22", "--json")
    data = json.loads(out)
    assert code == 0 and data["verdict"] == "allow" and data["rule"]["tier"] == "infrastructure"


@pytest.mark.parametrize("args,msg", [
    (("--src", "ghost", "--dst", "web1", "--proto", "tcp", "--port", "80"), "no VM named 'ghost'"),
    (("--src", "web1", "--dst", "nowhere", "--proto", "tcp", "--port", "80"), "neither a VM name nor an IPv4"),
    (("--src", "web1", "--dst", "app1", "--proto", "tcp", "--port", "0"), "out of range"),
])
def test_explain_bad_arguments_are_named(args: tuple[str, ...], msg: str) -> None:
    code, _, err = run("explain", str(EXAMPLES / "three-tier.yaml"), *args)
    assert code == 2 and msg in err


def test_demo_prints_a_matrix_per_example() -> None:
    code, out, _ = run("demo", "--compile-only")
    assert code == 0 and out.count("reachability") == 2 and "fin-desk1" in out and "tcp/5432" in out


def test_console_script_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("check", "compile", "explain", "demo"):
        assert cmd in proc.stdout


def _run_config(tmp_path: Path, scenario: Path) -> Path:
    config = tmp_path / "goldilocks.yaml"
    config.write_text(f"scenario: {scenario}\ndatabase: sqlite:///{tmp_path / 'g.db'}\napi: false\n"
                      "hypervisors: {hv1: {ovsdb: 'unix:/nonexistent/db.sock', bridge: br-int}}\n")
    return config


def test_run_does_not_read_the_scenario_again_once_the_database_is_seeded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/running.md: after the first start "the scenario file is not read again". It was
    # parsed and checked on every start all the same: a file edited (or broken) since refused
    # the restart, and 2000 VMs of it cost half a second before the controller could listen.
    from controller import service
    from controller.boot import open_store

    scenario = tmp_path / "scenario.yaml"
    scenario.write_text((EXAMPLES / "three-tier.yaml").read_text())
    open_store(f"sqlite:///{tmp_path / 'g.db'}", scenario, io.StringIO()).close()
    scenario.write_text("hypervisors: [\n  {name: hv1\n")  # no longer even YAML
    started: list[object] = []
    monkeypatch.setattr(service, "run", lambda config, restores=None: started.append(config) or 0)
    code, _, err = run("run", "--config", str(_run_config(tmp_path, scenario)))
    assert (code, err, len(started)) == (0, "", 1)


def test_run_lists_the_problems_of_a_scenario_that_would_seed_an_empty_database(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("hypervisors: [{name: hv1}]\nvms: [{name: a, hypervisor: nowhere}]\n")
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "run", "--config", str(_run_config(tmp_path, scenario))],
                          capture_output=True, text=True, timeout=60, cwd=EXAMPLES.parent, check=False)
    assert proc.returncode == 1
    assert f"{scenario}: 1 problem:" in proc.stderr and "nowhere" in proc.stderr


def test_the_config_carries_the_digest_of_the_bytes_it_was_read_from(tmp_path: Path) -> None:
    import hashlib

    from controller.config import ConfigError, load_config

    path = _run_config(tmp_path, EXAMPLES / "three-tier.yaml")
    assert load_config(path).digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_config(path).restore is True
    path.write_bytes(path.read_bytes() + b"openflow: {restore: false}\n")
    assert load_config(path).restore is False
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)



def test_restores_started_before_the_command_line_was_parsed_hold_the_start_only_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # controller/cli.py waits up to FIRST_WAIT_S for restores it started from the restore plan;
    # `run` then waited as long again for the same restores (a start at 2,000 VMs, whose
    # restore takes 2.4 s, came up a second late).
    from controller import service
    from controller.cli_commands import run_command
    from controller.warmstart import Restores

    class Counted(Restores):
        def __init__(self) -> None:
            super().__init__({})
            self.waits: list[float] = []

        def wait(self, timeout: float = 6.0) -> dict:
            self.waits.append(timeout)
            return {}

    monkeypatch.setattr(service, "run", lambda config, restores=None: 0)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text((EXAMPLES / "three-tier.yaml").read_text())
    config = str(_run_config(tmp_path, scenario))
    early = Counted()
    assert run_command(["run", "--config", config], io.StringIO(), io.StringIO(), early) == 0
    assert early.waits == []
