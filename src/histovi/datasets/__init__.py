"""Built-in data: the multi-patient simulator and loaders of public data sets."""

from ._simulate import DOMAINS, simulate

__all__ = ["DOMAINS", "simulate"]
