"""Keep torch's thread count as the user set it.

numba's OpenMP threading layer (UMAP, pynndescent, scanpy's neighbours and Leiden, scib-metrics)
calls ``omp_set_num_threads`` with its own count (every core) the first time it runs a parallel
loop. torch shares that OpenMP runtime, so after a UMAP the next training in the same process
ran on another number of threads and gave another latent in the last digits, although seed,
data and versions were the same. Every histovi function that may run numba restores torch's
thread count when it returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def keeps_torch_threads[F: Callable](func: F) -> F:
    """Decorator: restore ``torch.get_num_threads()`` after ``func``, however it returns."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import torch

        n_threads = torch.get_num_threads()
        try:
            return func(*args, **kwargs)
        finally:
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)

    return wrapper  # type: ignore[return-value]
