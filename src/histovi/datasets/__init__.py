"""Built-in data: the multi-patient simulators and loaders of public data sets."""

from ._her2st import her2st
from ._layers import LAYERS, simulate_layers
from ._simulate import DOMAINS, simulate

__all__ = ["DOMAINS", "LAYERS", "her2st", "simulate", "simulate_layers"]
