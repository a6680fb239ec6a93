"""The store: Goldilocks' source of truth in SQLite or PostgreSQL (docs/store.md).

A shell package: the pure core never imports it. Values in and out are controller.model and
controller.store.records types; SQLAlchemy rows never leave the package.
"""

from controller.store.database import DEFAULT_URL
from controller.store.errors import Conflict, NotFound, Rejected, StoredState, StoreError
from controller.store.store import Store

__all__ = ["DEFAULT_URL", "Conflict", "NotFound", "Rejected", "Store", "StoreError", "StoredState"]
