"""The output folder of :func:`histovi.pipeline.run` (and ``histovi run``): nothing is lost.

A folder holding a finished run is refused unless ``overwrite``; with it, only the files a run
recorded writing there are replaced (never the input, never files of the user's under an output
name). The run record, ``.histovi_run.json``, holds the run's options, its status ('running'
until every output is written) and every output written so far (name -> size and time, or
'dir'). A killed run is finished by running it again with the same options: training resumes
from ``checkpoints/last.ckpt`` (see ``HistoVI.train(checkpoint_dir=)``). Every file is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

#: What a run writes into its folder: the only paths ``overwrite`` replaces.
OUTPUT_FILES = (
    "adata.h5ad",
    "metrics.json",
    "report.html",
    "domains.png",
    "labels.png",
    "umap.png",
    "training.png",
)
OUTPUT_DIRS = ("model", "checkpoints")
#: The run record: options, status ('running' until every output is written), outputs written.
STATUS_FILE = ".histovi_run.json"
#: Files a run writes inside its output folders (the only ones ``overwrite`` removes there).
_DIR_FILES = {"model": ("model.pt", "adata.h5ad", "mdata.h5mu"), "checkpoints": ("last.ckpt",)}


class InputError(ValueError):
    """Bad input, options or output folder: ``histovi run`` reports it as one line (exit 2)."""


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary name beside ``path``; rename it to ``path`` once written."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_stamp(path: Path) -> list[int]:
    st = os.lstat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def write_record(
    out: Path, status: str, options: dict[str, Any], written: dict[str, Any] | None = None
) -> None:
    """Write the run record: status, options and every output written so far."""
    from . import __version__

    record = {
        "status": status,
        "histovi": __version__,
        "options": options,
        "time": time.time(),
        "written": dict(written or {}),
    }
    with atomic_file(out / STATUS_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def read_record(out: Path) -> dict[str, Any] | None:
    """The run record in ``out`` (None when there is none; status 'unreadable' when the file is
    not one: a folder, a FIFO, bad JSON)."""
    from ._files import open_regular

    path = out / STATUS_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        with open_regular(path, "run record") as f:
            record = json.loads(f.read().decode())
    except (OSError, ValueError):
        return {"status": "unreadable"}
    if not isinstance(record, dict) or not isinstance(record.get("status"), str):
        return {"status": "unreadable"}
    return record


def existing_outputs(out: Path) -> list[str]:
    names = (*OUTPUT_FILES, *OUTPUT_DIRS)
    return [n for n in names if (out / n).exists() or (out / n).is_symlink()]


def not_written_by_histovi(out: Path, record: dict[str, Any] | None) -> list[str]:
    """Output names in ``out`` that no histovi run recorded writing (or changed since)."""
    existing = existing_outputs(out)
    if record is None or record.get("status") == "unreadable":
        return existing
    written = record.get("written")
    if not isinstance(written, dict):
        return []  # the record of an earlier histovi, which listed no files: its outputs
    bad = []
    for name in existing:
        path, rec = out / name, written.get(name)
        if rec is None:
            bad.append(name)
        elif rec == "dir":
            if path.is_symlink() or not path.is_dir():
                bad.append(name)
        elif path.is_symlink() or not path.is_file() or file_stamp(path) != list(rec):
            bad.append(f"{name} (changed since histovi wrote it)")
    return bad


def input_conflicts(out: Path, input_path: str | None) -> list[str]:
    """Outputs of ``out`` that are (or hold, or lie in) the input: never to be replaced."""
    if input_path is None:
        return []
    from ._files import is_within

    inp = Path(input_path).expanduser()
    if not inp.exists():
        return []
    conflicts = []
    if inp.is_dir() and out.exists() and out.resolve() == inp.resolve():
        conflicts.append("--out is the --input folder")
    for name in (*OUTPUT_FILES, STATUS_FILE, *OUTPUT_DIRS):
        path = out / name
        if not path.exists():
            continue
        try:
            same = os.path.samefile(path, inp)
        except OSError:
            same = False
        if same or is_within(inp, path) or (inp.is_dir() and is_within(path, inp)):
            conflicts.append(name)
    return conflicts


def remove_outputs(out: Path) -> None:
    """Remove the outputs a previous run wrote (checked by :func:`check_out`): its files, and
    in its folders only the files histovi writes there (a folder left non-empty is kept)."""
    for name in OUTPUT_FILES:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    for name in OUTPUT_DIRS:
        remove_histovi_dir(out / name)
    (out / STATUS_FILE).unlink(missing_ok=True)


def remove_histovi_dir(folder: Path) -> None:
    if folder.is_symlink() or not folder.is_dir():
        return
    ours = _DIR_FILES.get(folder.name, ())
    for f in folder.iterdir():
        temporary = f.name.startswith(".") and f.name.endswith(".tmp")
        if (f.name in ours or temporary) and (f.is_file() or f.is_symlink()):
            f.unlink()
    try:
        folder.rmdir()
    except OSError:  # files histovi did not write: kept, and the folder with them
        pass


def check_out(out: Path, options: dict[str, Any], overwrite: bool) -> str:
    """Check the output folder before any work; return 'new', 'resume' or 'overwrite'.

    An output that is (or holds) the input is refused whatever the options. A folder with a
    finished run (or with outputs and no record) is refused unless ``overwrite``; with it, only
    files a histovi run recorded writing there are replaced (anything else under an output name
    is refused). One with an unfinished run of the same options is finished; one with an
    unfinished run of other options is refused.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file: pass a folder")
    conflicts = input_conflicts(out, options.get("input"))
    if conflicts:
        raise InputError(
            f"--out {str(out)!r} would replace the input {str(options.get('input'))!r} "
            f"({', '.join(conflicts)}): histovi never writes over or deletes its input; choose "
            "another --out"
        )
    record = read_record(out)
    existing = existing_outputs(out)
    foreign = not_written_by_histovi(out, record)
    if overwrite:
        if record is not None and record.get("status") == "unreadable":
            raise InputError(
                f"--out {str(out)!r} holds a {STATUS_FILE} that is not a histovi run record: "
                "histovi does not replace files it did not write; choose another --out"
            )
        if foreign:
            raise InputError(
                f"--out {str(out)!r} holds {', '.join(foreign)}, which no histovi run recorded "
                "writing there: --overwrite replaces only histovi's own outputs. Move them away "
                "or choose another --out"
            )
        return "overwrite" if existing or record else "new"
    if record is not None and record.get("status") == "running":
        _check_unfinished(out, record, options, foreign)
        return "resume"
    if record is not None or existing:
        what = ", ".join(existing) or STATUS_FILE
        raise InputError(
            f"--out {str(out)!r} already holds the outputs of a previous run ({what}): pass "
            "--overwrite to replace them, or choose another --out"
        )
    return "new"


def _check_unfinished(out: Path, record: dict, options: dict, foreign: list[str]) -> None:
    before = record.get("options") or {}
    differ = sorted(k for k in set(before) | set(options) if before.get(k) != options.get(k))
    if differ:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {before.get(k)!r} (now {options.get(k)!r})" for k in differ
        )
        raise InputError(
            f"--out {str(out)!r} holds an unfinished run with other options ({shown}): run "
            "the same command again to finish it, pass --overwrite to start over, or "
            "choose another --out"
        )
    if foreign:
        raise InputError(
            f"--out {str(out)!r} holds {', '.join(foreign)}, which the unfinished run did "
            "not write: move them away or choose another --out"
        )


class RunFolder:
    """The output folder of one run: started once the input is valid, every output recorded as
    it is written, marked complete at the end."""

    def __init__(self, out: Path, options: dict[str, Any], mode: str):
        self.out, self.options, self.mode = out, options, mode
        self.written: dict[str, Any] = {}

    def start(self) -> None:
        """Remove a previous run's outputs (``overwrite``) and mark the run as running."""
        if self.mode == "resume":
            self.written = dict((read_record(self.out) or {}).get("written") or {})
        self.written["checkpoints"] = "dir"  # train(checkpoint_dir=) creates it
        try:
            if self.mode == "overwrite":
                remove_outputs(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            write_record(self.out, "running", self.options, self.written)
        except OSError as err:
            raise InputError(
                f"cannot write into --out {str(self.out)!r}: {err.strerror or err}"
            ) from err

    def wrote(self, name: str) -> None:
        """Record that the run wrote ``out / name`` (a file's size and time, or a folder)."""
        path = self.out / name
        self.written[name] = "dir" if path.is_dir() else file_stamp(path)
        write_record(self.out, "running", self.options, self.written)

    def complete(self) -> None:
        """Every output is written: the checkpoint is not needed, the run is finished."""
        remove_histovi_dir(self.out / "checkpoints")
        if not (self.out / "checkpoints").exists():
            self.written.pop("checkpoints", None)
        write_record(self.out, "complete", self.options, self.written)
