"""Feature stores: one HDF5 file of encoder features plus the per-image table.

The public API (``docs/architecture.md``, schema in ``docs/stores.md``)::

    from credanno import stores
    with stores.open("stores/NAME.h5") as s:        # read-only, lazy
        X = s.features(split="train", kind="cls")   # float32 (n_train, D)
        y = s.labels("malignancy", split="train")
    w = stores.create(path, table=df, feature_sets={"cls": 384}, provenance={...})
    w.append({"cls": batch}); w.close()
"""

from credanno.stores.compat import IDENTITY_KEYS, check_compatible, latest
from credanno.stores.reader import Store, open_store
from credanno.stores.schema import LOCKING_ENV, SCHEMA, SCHEMA_VERSION, hdf5_locking
from credanno.stores.writer import StoreWriter, create, save

open = open_store  # noqa: A001 - `stores.open(path)` is the documented entry point

__all__ = [
    "IDENTITY_KEYS", "LOCKING_ENV", "SCHEMA", "SCHEMA_VERSION", "Store", "StoreWriter",
    "check_compatible", "create", "hdf5_locking", "latest", "open", "open_store", "save",
]
