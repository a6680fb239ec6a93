"""Small shared helpers for tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from controller.events import ContextReported
from controller.model import VM, Attr, Provenance


def logout_event(vm: VM) -> ContextReported:
    """The agent's next report for `vm`: the same guest context with nobody logged in
    (directory groups derive from logins, so they go too)."""
    kept = frozenset(f for f in vm.facts if f.provenance is Provenance.GUEST
                     and f.attr not in (Attr.USER, Attr.USERGROUP))
    return ContextReported(vm.uuid, Provenance.GUEST, kept)


def login_again_event(vm: VM) -> ContextReported:
    """`vm`'s original guest report (as loaded), logins included."""
    return ContextReported(vm.uuid, Provenance.GUEST, frozenset(
        f for f in vm.facts if f.provenance is Provenance.GUEST and f.attr is not Attr.USERGROUP))


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a controller certificate and a switch certificate signed by it, and a rogue switch
    certificate signed by nobody we trust."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    for name, ca in (("controller", "ca"), ("switch", "ca"), ("rogue", "rogue-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt")
    return {p.stem + p.suffix: p for p in tmp.iterdir()}
