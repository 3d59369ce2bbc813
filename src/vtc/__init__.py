"""vtc: training-free visual token compression for vision-language models."""

from .methods import Budget, Selection, Signals, VTCError, available, get

__version__ = "0.1.0"
__all__ = ["Budget", "Selection", "Signals", "VTCError", "available", "get", "__version__"]
