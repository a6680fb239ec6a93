#!/usr/bin/env bash
# Install what Goldilocks needs on a Debian 12 machine, and the Python venv. Idempotent.
#  - apt packages: skipped when all are installed already
#  - no system Open vSwitch or OVN daemons are left running: tests start their own (DESIGN.md §1);
#    OVN (ovn-central, ovn-host) is for bench/peer, which runs it in a private sandbox
#  - nor Debian's PostgreSQL cluster: the store tests initdb and start a private server
#  - .venv with Python >= 3.11, `pip install -e '.[dev]'` (skipped when setup.cfg/pyproject
#    are unchanged since the last install), in setuptools' compat editable mode: a plain path
#    in a .pth file. The default mode's import finder costs every Python start ~20 ms here,
#    and `goldilocks run` puts flows back on emptied bridges within its first ~50 ms.
#  - the sources compiled to bytecode, as a wheel install does (PYTHONDONTWRITEBYTECODE may
#    be set), so no start compiles them
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(openvswitch-switch openvswitch-common ethtool iputils-ping iproute2 mininet python3-venv openssl postgresql
              ovn-central ovn-host)
TOOLS=(ovs-vswitchd ovsdb-server ovsdb-tool ovs-vsctl ovs-ofctl ovs-appctl ethtool ping ip mn openssl runuser
       ovn-northd ovn-controller ovn-nbctl ovn-sbctl ovn-appctl)
# PostgreSQL's server tools live in /usr/lib/postgresql/<version>/bin, off PATH.
PG_TOOLS=(initdb pg_ctl)
export PATH="$PATH:/usr/sbin:/sbin"
EDITABLE_MODE=compat

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_needed() {
    local pkg tool
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || return 0
    done
    for tool in "${TOOLS[@]}"; do command -v "$tool" >/dev/null || return 0; done
    for tool in "${PG_TOOLS[@]}"; do pg_tool "$tool" >/dev/null || return 0; done
    return 1
}

pg_tool() {
    # The newest installed PostgreSQL's copy of a server tool (tests/store/postgres.py looks
    # in the same place).
    local found
    found="$(ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$found" ] && [ -x "$found" ] && echo "$found"
}

install_packages() {
    if ! apt_needed; then
        echo "setup: system packages present"
        return
    fi
    echo "setup: installing ${APT_PACKAGES[*]}"
    # Keep the packages' init scripts from starting system daemons during the install.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        made_policy=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${APT_PACKAGES[@]}"
    if [ "$made_policy" -eq 1 ]; then as_root rm -f "$policy"; fi
}

stop_system_ovs() {
    # Tests run their own ovsdb-server/ovs-vswitchd; a system service must never interfere.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now openvswitch-switch ovs-vswitchd ovsdb-server \
            ovn-central ovn-host ovn-northd ovn-controller ovn-ovsdb-server-nb ovn-ovsdb-server-sb \
            >/dev/null 2>&1 || true
    else
        local script
        for script in ovn-host ovn-central openvswitch-switch; do
            if [ -x "/etc/init.d/$script" ]; then as_root "/etc/init.d/$script" stop >/dev/null 2>&1 || true; fi
        done
    fi
    # Daemons started by the package's init script leave pidfiles here (only these are ours
    # to stop: private test sandboxes keep theirs in their own directories).
    local pidfile pid
    for pidfile in /var/run/openvswitch/ovs-vswitchd.pid /var/run/openvswitch/ovsdb-server.pid \
            /var/run/ovn/ovn-controller.pid /var/run/ovn/ovn-northd.pid /var/run/ovn/ovnnb_db.pid \
            /var/run/ovn/ovnsb_db.pid; do
        [ -f "$pidfile" ] || continue
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            echo "setup: stopping system OVS/OVN daemon pid $pid ($pidfile)"
            as_root kill "$pid" 2>/dev/null || true
        fi
    done
}

stop_system_postgresql() {
    # The package creates and may start a "main" cluster on port 5432; tests never use it.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
    if command -v pg_lsclusters >/dev/null; then
        local version cluster status
        while read -r version cluster _ status _; do
            if [ "$status" = "online" ]; then
                echo "setup: stopping system PostgreSQL cluster $version/$cluster"
                as_root pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
            fi
        done < <(pg_lsclusters --no-header 2>/dev/null)
    fi
}

# Debian's own interpreter first: built with PGO and LTO and linked statically, it starts and
# runs the controller about a third faster than a plain source build (a pyenv one, say) on the
# same machine (bench/README.md), and it is the Python a Debian 12 host has anyway.
pick_python() {
    local candidate
    for candidate in /usr/bin/python3.11 /usr/bin/python3.12 python3.11 python3.12 python3 /usr/bin/python3; do
        command -v "$candidate" >/dev/null || continue
        if "$candidate" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
            command -v "$candidate"
            return
        fi
    done
    echo "setup: no Python 3.11 or 3.12 found" >&2
    return 1
}

make_venv() {
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
        local python
        python="$(pick_python)"
        echo "setup: creating .venv with $python"
        rm -rf .venv
        "$python" -m venv .venv
    fi
    local stamp=.venv/.goldilocks-install digest
    digest="$( (cat setup.cfg pyproject.toml; echo "$EDITABLE_MODE") | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && .venv/bin/python -c 'import controller' 2>/dev/null; then
        echo "setup: .venv up to date"
    else
        # setuptools warns that compat mode is transitional: its output is shown only on failure.
        if ! .venv/bin/python -m pip install -q -e '.[dev]' --config-settings "editable_mode=$EDITABLE_MODE" \
                >.venv/pip-install.log 2>&1; then
            cat .venv/pip-install.log >&2
            return 1
        fi
        echo "$digest" > "$stamp"
    fi
    .venv/bin/python -m compileall -q -j 0 apps controller fleet bench >/dev/null
}

install_packages
stop_system_ovs
stop_system_postgresql
make_venv
echo "setup: done"
