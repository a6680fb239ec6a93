"""python-ovs as the controller loads it: `from topology.ovslib import ovs`, before any other
import of an `ovs` module.

- `ovs.poller` imports eventlet, when it is installed (os-ken depends on it), only to ask whether
  eventlet has monkey-patched `select`. Nothing has unless eventlet is already imported (os-ken's
  eventlet hub imports it first); otherwise the import costs about 0.2 s of every start, before
  the OVSDB monitors can connect, and logs a deprecation warning.
- python-ovs's JSON-RPC then parses with topology.ovsjson.FastParser.
"""

from __future__ import annotations

import sys

from topology import ovsjson


def _import_poller_without_eventlet() -> None:
    if "eventlet" in sys.modules or "ovs.poller" in sys.modules:
        return  # eventlet is loaded (and may patch select): the poller must see it; or done
    sys.modules["eventlet"] = None  # type: ignore[assignment]  # makes `import eventlet` fail
    try:
        import ovs.poller  # noqa: F401 - imported for good, without eventlet
    finally:
        if sys.modules.get("eventlet", 0) is None:
            del sys.modules["eventlet"]


_import_poller_without_eventlet()
ovsjson.install()

# After the two steps above, which decide how python-ovs loads.
import ovs.db.idl
import ovs.json
import ovs.jsonrpc
import ovs.poller
import ovs.stream
import ovs.timeval

__all__ = ["ovs"]
