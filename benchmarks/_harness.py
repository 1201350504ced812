"""What every benchmark shares: the subprocess runner with peak memory, the cache keys and the
table writer.

Cost measurement: a job (one method of the integration benchmark, one held-out patient of the
reference mapping, one size of the scaling benchmark) runs in its own Python process, so that its
peak resident set size is its own. Inside, :class:`Meter` measures a block: wall time
(``time.perf_counter``) and the peak RSS above the RSS at its start, as the larger of a psutil
sampler (every 20 ms) and ``getrusage``'s ``ru_maxrss`` when it rose (torch's allocations are
seen; tracemalloc would miss them). The job imports its libraries and loads its data before the
block, so neither counts as its cost. ``isolate=False`` runs the job in the calling process
(tests): memory numbers are then biased low.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / "results" / "cache"


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _maxrss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class Meter:
    """Wall time and peak RSS above the start of a ``with`` block (``wall_s``, ``peak_mb``)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.wall_s, self.peak_mb = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __enter__(self) -> Meter:
        self._rss0, self._maxrss0 = _rss(), _maxrss()
        self._peak = self._rss0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        peak = max(self._peak, _rss())
        if _maxrss() > self._maxrss0:
            peak = max(peak, _maxrss())
        self.peak_mb = max(peak - self._rss0, 0) / 2**20


def limit_threads(threads: int | None) -> None:
    """Cap torch's threads: on a shared CPU, extra OpenMP threads mostly spin."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def run_job(
    module: str, function: str, kwargs: dict[str, Any], log: Path, isolate: bool = True
) -> dict[str, Any]:
    """``module.function(**kwargs)`` (a module of ``benchmarks/``) in its own Python process, or
    here with ``isolate=False``. Returns its JSON-able result, or ``{'status': 'failed',
    'error': ...}`` with the tail of its log when it raised or died."""
    if not isolate:
        try:
            return getattr(importlib.import_module(module), function)(**kwargs)
        except Exception as err:  # a failing job is reported, never given numbers
            return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    log.parent.mkdir(parents=True, exist_ok=True)
    spec, result = log.with_suffix(".spec.json"), log.with_suffix(".result.json")
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"module": module, "function": function, "kwargs": kwargs}))
    threads = str(kwargs.get("threads") or 1)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, str(spec)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode == 0 and result.exists():
        return json.loads(result.read_text())
    tail = log.read_text()[-1200:].strip().splitlines()
    error = next((ln for ln in reversed(tail) if ln.strip()), "") if tail else ""
    return {
        "status": "failed",
        "error": f"process exited with code {proc.returncode}: {error}",
        "log": str(log),
    }


def _child(spec_path: str) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    spec = json.loads(Path(spec_path).read_text())
    out = getattr(importlib.import_module(spec["module"]), spec["function"])(**spec["kwargs"])
    result = Path(spec_path.replace(".spec.json", ".result.json"))
    result.with_suffix(".tmp").write_text(json.dumps(out, default=str))
    result.with_suffix(".tmp").replace(result)


# --------------------------------------------------------------------------- cache


@functools.cache
def source_digest(package: str = "histovi") -> str:
    """Hash of a package's installed source files: a cached result of code that changed since
    is not reused."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    h = hashlib.sha1()
    for path in sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def _distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


def code_version(modules: tuple[str, ...]) -> dict[str, str]:
    """What a cached result was computed with: histovi's source digest and the installed
    version of each other package."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for m in modules:
        if m == "histovi":
            out[m] = source_digest()
            continue
        try:
            out[m] = version(_distributions().get(m, [m])[0])
        except PackageNotFoundError:
            out[m] = "unknown"
    return out


def safe_name(name: str) -> str:
    """File-name stem of a method; an inline variant gets a hash of its whole name."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    if any(c in name for c in ":=,"):
        safe = safe[:60] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe


def save_json(path: Path, obj: Any) -> None:
    """Write aside and rename: a kill mid-write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(obj, indent=1, default=str))
    path.with_suffix(".tmp").replace(path)


def load_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- tables


def fmt(x: Any, sd: Any = None, digits: int = 3) -> str:
    """A number for a table: ``–`` when missing, ``mean ± sd`` when ``sd`` is given."""
    if x is None or (isinstance(x, float | np.floating) and not np.isfinite(x)):
        return "–"
    if not isinstance(x, float | np.floating):
        return str(x)
    if sd is not None and np.isfinite(sd):
        return f"{x:.{digits}f} ± {sd:.{digits}f}"
    return f"{x:.{digits}f}"


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """The one table writer: ``DataFrame.to_markdown`` (needs ``tabulate``, in the benchmarks
    extra), floats with ``digits`` decimals; pandas' plain text where tabulate is missing."""
    shown = df.map(lambda v: fmt(v, None, digits) if isinstance(v, float | np.floating) else v)
    try:
        return shown.to_markdown(index=False) + "\n"
    except ImportError:
        return shown.to_string(index=False) + "\n"


if __name__ == "__main__":
    _child(sys.argv[1])
