"""Concurrent API requests: many threads writing through one Store, and two Stores (two
processes' worth) on one SQLite file, without "database is locked"."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from controller.model import VM, Hypervisor, VNic
from controller.store import Store

THREADS = 8
PER_THREAD = 15


def _vm(t: int, i: int) -> VM:
    n = t * 100 + i
    return VM(f"vm-{t}-{i}", f"vm{n}", "hv1", (VNic(f"02:00:00:00:{t:02x}:{i:02x}", (f"10.1.{t}.{i + 1}",), None),))


def _writer(store: Store, t: int, start: threading.Barrier) -> None:
    start.wait()
    for i in range(PER_THREAD):
        store.create_vm(_vm(t, i), actor=f"thread{t}")
        store.set_tags(f"vm-{t}-{i}", {"n": str(i)}, actor=f"thread{t}")
        assert store.get_vm(f"vm-{t}-{i}") is not None  # reads interleave with writes


def test_threads_write_at_once(store: Store) -> None:
    store.upsert_hypervisor(Hypervisor("hv1"), actor="ops")
    start = threading.Barrier(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(_writer, store, t, start) for t in range(THREADS)]:
            future.result()  # re-raises "database is locked", if any
    assert len(store.list_vms()) == THREADS * PER_THREAD
    assert len(store.audit_log(limit=10_000, action_prefix="vm.")) == 2 * THREADS * PER_THREAD


def test_two_stores_on_one_sqlite_file(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    stores = [Store(url), Store(url)]
    try:
        stores[0].upsert_hypervisor(Hypervisor("hv1"), actor="ops")
        start = threading.Barrier(THREADS)
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(_writer, stores[t % 2], t, start) for t in range(THREADS)]
            for future in futures:
                future.result()
        assert len(stores[1].list_vms()) == THREADS * PER_THREAD
    finally:
        for s in stores:
            s.close()
