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
from . import baselines, cdpruner, divprune, downsample, evit, fastervlm, fopru, holov, prumerge, recoverable, todre, tome, visiontrim, vispruner, visionzip  # noqa: F401,E501  (registers the methods)
from . import flowcut, tome_tower  # noqa: F401  (in-tower methods: they run inside the vision tower)
from . import dart, fastv, feather, pyramiddrop, sparsevlm  # noqa: F401  (in-LLM methods)
from . import vscan  # noqa: F401  (vision side with its own in-LLM stage)
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
