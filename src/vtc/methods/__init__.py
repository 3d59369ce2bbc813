"""Compression methods: pure tensor code behind one registry.

>>> from vtc import methods
>>> methods.available()            # names
>>> m = methods.get("recoverable")  # an instance
>>> selections = m.select(signals, "auto")
"""

from .base import (
    AttentionSpec,
    Budget,
    Method,
    Origin,
    Selection,
    Signal,
    Signals,
    TextSpec,
    VTCError,
    available,
    get,
    register,
    register_factory,
)
from . import baselines, cdpruner, divprune, downsample, evit, fastervlm, fopru, prumerge, recoverable, todre, tome, vispruner, visionzip  # noqa: F401,E501  (registers the methods)
from . import visiontrim  # noqa: F401  (registers the method)
from . import dart, fastv, feather, pyramiddrop, sparsevlm  # noqa: F401  (in-LLM methods)
from .recoverable import WithTextRecovery

__all__ = [
    "AttentionSpec",
    "Budget",
    "Method",
    "Origin",
    "Selection",
    "Signal",
    "Signals",
    "TextSpec",
    "VTCError",
    "WithTextRecovery",
    "available",
    "get",
    "register",
    "register_factory",
]
