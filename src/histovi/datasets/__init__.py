"""Built-in data: the multi-patient simulator and loaders of public data sets."""

from ._her2st import her2st
from ._simulate import DOMAINS, simulate

__all__ = ["DOMAINS", "her2st", "simulate"]
