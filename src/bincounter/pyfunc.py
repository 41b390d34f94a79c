"""Deprecated import path, kept so models logged before the package was split into wings still load.

Their python_model.pkl names `bincounter.pyfunc.BinCounterPyfunc`; the class now lives in
bincounter.serving.pyfunc. New code imports it from there.
"""

import warnings

from bincounter.serving.pyfunc import BinCounterPyfunc  # noqa: F401

warnings.warn("bincounter.pyfunc is deprecated: the model class is bincounter.serving.pyfunc.BinCounterPyfunc",
              DeprecationWarning, stacklevel=2)
