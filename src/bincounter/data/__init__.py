"""The data wing: one module per DVC stage, each with a function of the stage's name (catalog.build_catalog,
fetch.fetch, split.split with eda.write_report, prepare.prepare, sync.sync), and shards.py, the tar shards
fetch and prepare write; source.py reads the bucket or a local folder, and listing.py sorts its listing on disk
for the catalog. Imports no other wing."""

from bincounter._lazy import lazy_names

STAGES = ("catalog", "fetch", "split", "prepare", "sync")  # the modules: `from bincounter.data import fetch`
_PUBLIC = {"read_manifest": "source", "build_catalog": "catalog", "select": "catalog",
           "read_catalog": "catalog", "read_split": "split", "write_report": "eda", "read_labels": "prepare",
           "channel_uris": "sync"}
__all__ = list(STAGES) + list(_PUBLIC)
__getattr__ = lazy_names(__name__, _PUBLIC, modules=STAGES)
