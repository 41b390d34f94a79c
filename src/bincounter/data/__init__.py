"""The data wing: one module per DVC stage, each with a function of the stage's name (fetch.fetch,
split.split with eda.write_report, prepare.prepare, sync.sync). Imports no other wing."""

from bincounter._lazy import lazy_names

STAGES = ("fetch", "split", "prepare", "sync")  # the modules: `from bincounter.data import fetch`
_PUBLIC = {"read_manifest": "fetch", "read_split": "split", "write_report": "eda", "load_prepared": "prepare",
           "channel_uris": "sync"}
__all__ = list(STAGES) + list(_PUBLIC)
__getattr__ = lazy_names(__name__, _PUBLIC, modules=STAGES)
