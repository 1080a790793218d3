"""Where data lives and how to reach it: :class:`Storage`, the one facade over local paths
(:mod:`.local`) and S3-compatible storage (:mod:`.s3`); :class:`Location`, a parsed URI;
the settings that travel to Ray workers (:mod:`.settings`); and the run lease (:mod:`.lease`)."""

from covidray.storage.location import Location, StorageError, StorageOutage
from covidray.storage.settings import StorageSettings
from covidray.storage.s3 import is_transient
from covidray.storage.store import Storage

__all__ = ["Location", "Storage", "StorageError", "StorageOutage", "StorageSettings",
           "is_transient"]
