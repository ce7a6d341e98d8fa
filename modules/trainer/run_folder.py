"""The run folder: checked before the model loads, owned by one run at a time, and never a place
where a new run overwrites an earlier run's files.

- :func:`check_run_folder` says, before anything heavy happens, whether the folder can be used
  (it is not a file, it can be created, a file can be written in it).
- :class:`RunLock` makes the folder one run's at a time: an exclusive ``flock`` on
  ``.maskprior-run.lock`` inside it, which holds the owner's process id for the message a second
  run gets. The operating system drops the lock when its process ends, however it ends, so a
  crashed or killed run never leaves the folder locked.
- :func:`keep_previous_run` moves an earlier run's files (whatever its ``output.name``) to
  ``previous/<date-time>/``; the trainer calls it once the new run has passed every check and is
  about to train, so a run that fails early leaves the folder as it was.
- :func:`continue_run` makes the folder the run a backup belongs to, up to the backup's step,
  when a run resumes: the rows and TensorBoard events of the steps after it are dropped, and a
  backup of another run (an earlier one kept in ``previous/``, another folder) moves the
  folder's own run aside first and brings its run's history along, so no file ever mixes
  two runs.
- :class:`MetricsLog` appends ``metrics.jsonl`` rows; a row that cannot be written (a full disk)
  is kept in memory and written with the next one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from modules.atomic import write_bytes_atomic, write_text_atomic
from modules.config import ConfigError

LOCK_NAME = ".maskprior-run.lock"
PREVIOUS = "previous"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
BACKUPS = "backups"
LOGS = "logs"
"""The trackers' folder (TensorBoard's event files, ``logs/<output.name>/``)."""

try:  # POSIX; elsewhere the folder is not locked (see RunLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def check_run_folder(run_dir: Path, *, create: bool) -> None:
    """A ConfigError naming ``output.run_dir`` and the fix when the folder cannot hold a run.

    With ``create`` the folder is made (as training does); without it (``check``) nothing is
    written, and the nearest existing parent must be a folder a file can be created in.
    """
    field = f"output.run_dir: '{run_dir}'"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{field} is a file, not a folder: choose another run folder")
    if not create:
        existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
        if not existing.is_dir():
            raise ConfigError(f"{field} cannot be created: '{existing}' is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}: '{existing}' is not writable; choose another folder")
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{field} cannot be created ({error.strerror}): choose another run folder"
        ) from None
    try:
        # A real write, not os.access: a read-only mount or a full disk shows only this way.
        with tempfile.TemporaryFile(dir=run_dir) as probe:
            probe.write(b"maskprior")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise ConfigError(
            f"{field} is not writable ({error.strerror}): free some space, fix its permissions "
            "or choose another run folder"
        ) from None


class RunLock:
    """The run folder's owner, from :meth:`acquire` to :meth:`release`.

    Without ``fcntl`` (Windows) the folder is not locked: two runs into one folder are then the
    user's to avoid."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._file: Any = None

    def acquire(self) -> None:
        """Own the folder, or a ConfigError naming the folder and the process that owns it."""
        if fcntl is None:  # pragma: no cover - Windows
            return
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"output.run_dir: '{self.path.parent}' is in use by another run ({owner}): wait "
                "for it to finish or stop it, or choose another run folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
            self._file.close()  # closing drops the flock
            self._file = None


def earlier_run_files(run_dir: Path) -> list[Path]:
    """The files an earlier run left in ``run_dir``, whatever its ``output.name``: its LoRAs
    (``.safetensors`` files this program wrote, read from their header), resolved configs
    (``NAME.json`` files with ``schema_version`` and ``output.name`` NAME), ``metrics.jsonl``,
    ``samples/``, ``backups/`` and ``logs/``. Anything else in the folder is the user's and
    stays there."""
    found = [run_dir / name for name in (METRICS, SAMPLES, BACKUPS) if (run_dir / name).exists()]
    logs = run_dir / LOGS  # a file of that name is not ours (the preflight names it)
    if logs.is_dir() and any(path.is_file() for path in logs.rglob("*")):
        found.append(logs)
    for path in sorted(run_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if (path.suffix == ".safetensors" and _is_our_lora(path)) or (
            path.suffix == ".json" and _is_resolved_config(path)
        ):
            found.append(path)
    return found


def keep_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's files into ``run_dir/previous/<date-time>/`` (a new folder each
    time, so nothing there is ever overwritten). Returns that folder, or None when there was
    nothing to move."""
    found = earlier_run_files(run_dir)
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, suffix = run_dir / PREVIOUS / stamp, 1
    while target.exists():
        target, suffix = run_dir / PREVIOUS / f"{stamp}_{suffix}", suffix + 1
    target.mkdir(parents=True)
    for path in found:
        path.rename(target / path.name)
    return target


def _is_our_lora(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return "maskprior.family" in (file.metadata() or {})
    except (OSError, SafetensorError):
        return False


def _is_resolved_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or "schema_version" not in data:
        return False
    # A run writes its config as <output.name>.json; a preset kept here is the user's file.
    output = data.get("output")
    return isinstance(output, dict) and output.get("name") == path.stem


class MetricsLog:
    """``metrics.jsonl``: one JSON line per row. :meth:`start` begins an empty file (the earlier
    one was moved aside). A row that cannot be written is kept and written with the next row,
    so a full disk loses no row once space is back; the first failure is returned for the
    trainer to report."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[str] = []

    def start(self) -> None:
        self.path.write_text("", encoding="utf-8")

    def resume(self, step: int, source: Path | None = None) -> int:
        """Continue the file of a resumed run (``source``: another run folder's file to continue,
        for a backup of another run): the rows after ``step`` (trained after the backup it
        resumes from) are dropped. Returns the rows kept."""
        source = source or self.path
        if not source.exists():
            self.start()
            return 0
        rows = [line for line in source.read_text(encoding="utf-8").splitlines() if line]
        kept = [row for row in rows if _row_step(row) <= step]
        write_text_atomic(self.path, "".join(row + "\n" for row in kept))
        return len(kept)

    def append(self, row: dict[str, Any]) -> OSError | None:
        """Write ``row`` (and any rows held back); the error when it could not, else None."""
        self._pending.append(json.dumps(row) + "\n")
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("".join(self._pending))
        except OSError as error:
            # Half a line would break every reader of the file: cut back to the last whole row.
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            return error
        self._pending.clear()
        return None

    @property
    def pending(self) -> int:
        return len(self._pending)


def _row_step(row: str) -> float:
    try:
        return float(json.loads(row).get("step", 0))
    except (ValueError, AttributeError, TypeError):  # a line cut short by a crash: dropped
        return float("inf")


def continue_run(run_dir: Path, backup: Path, step: int, metrics: MetricsLog) -> list[str]:
    """Make ``run_dir`` hold the run ``backup`` belongs to, as it was at ``step``, before a
    resumed run trains; returns what to say.

    The backup's run is the folder above its ``backups/``. When that is ``run_dir`` itself,
    its ``metrics.jsonl`` rows and TensorBoard events after ``step`` are dropped. Otherwise (a
    backup of an earlier run, kept in ``previous/``, or of another folder) the files of the
    run in ``run_dir`` are moved to ``previous/`` first, as a new run does, and the backup's
    run's rows and events up to ``step`` are copied in: every file then holds one run."""
    source = backup.parent.parent
    if backup.parent.name == BACKUPS and _same_folder(source, run_dir):
        metrics.resume(step)
        dropped = trim_events(run_dir / LOGS, step)
        return [f"TensorBoard: dropped the {dropped} events after step {step}"] if dropped else []
    said = []
    kept = keep_previous_run(run_dir)
    if kept is not None:
        said.append(f"The run folder held another run than the backup's: moved its files to {kept}")
    rows = metrics.resume(step, source / METRICS)
    events = copy_events(source / LOGS, run_dir / LOGS, step) if (source / LOGS).is_dir() else 0
    said.append(
        f"Continuing the run of {source} in {run_dir}: its {rows} metrics.jsonl rows"
        + (f" and {events} TensorBoard events" if events else "")
        + f" up to step {step} copied; its samples and LoRA files stay there"
    )
    return said


def _same_folder(one: Path, other: Path) -> bool:
    try:
        return one.resolve() == other.resolve() or one.samefile(other)
    except OSError:
        return False


def _event_files(logs: Path) -> list[Path]:
    return sorted(p for p in logs.rglob("*tfevents*") if p.is_file()) if logs.is_dir() else []


def trim_events(logs: Path, step: int) -> int:
    """Drop the TensorBoard events after ``step`` from the event files under ``logs`` (each
    rewritten atomically); returns how many were dropped."""
    dropped = 0
    for path in _event_files(logs):
        records, later = _read_events(path, step)
        if later:
            write_bytes_atomic(path, b"".join(records))
            dropped += later
    return dropped


def copy_events(source: Path, target: Path, step: int) -> int:
    """Copy the TensorBoard events up to ``step`` of the event files under ``source`` to the
    same places under ``target``; returns how many were copied."""
    copied = 0
    for path in _event_files(source):
        records, _ = _read_events(path, step)
        write_bytes_atomic(target / path.relative_to(source), b"".join(records))
        copied += len(records)
    return copied


def _read_events(path: Path, step: int) -> tuple[list[bytes], int]:
    """An event file's records (whole, checksums and all) up to ``step``, and how many came
    after it. A record cut short (a killed run) ends the file."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    data = path.read_bytes()
    kept, later, at = [], 0, 0
    while at + 12 <= len(data):
        # A record: length (u64), its checksum (u32), the Event, the Event's checksum (u32).
        (length,) = struct.unpack("<Q", data[at : at + 8])
        end = at + 12 + length + 4
        if end > len(data):
            break
        try:
            event_step = Event.FromString(data[at + 12 : at + 12 + length]).step
        except DecodeError:  # a damaged record ends the file
            break
        if event_step <= step:
            kept.append(data[at:end])
        else:
            later += 1
        at = end
    return kept, later


def os_error_reason(error: OSError) -> str:
    """A file system error in words for the user ("the disk is full", ...)."""
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    return error.strerror or str(error)
