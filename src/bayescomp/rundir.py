"""The run folder's life cycle: its names, the lock on its working folder, and the atomic move into place.

A run is written in ``DIR.partial`` and renamed to ``DIR`` when it is complete. Guarantees:

- One writer per run: the writer holds an OS lock (`fcntl.flock`) on ``DIR.partial/lock``, which records
  its pid; a second writer is refused with a one-line error naming that pid. The kernel drops the lock
  when the process ends, however it ends, so a dead writer never leaves a stale lock; where the file
  system has no `flock`, the pid in the file says whether the holder still runs.
- Names never collide: ``.partial`` is reserved for working folders and refused as an output name.
- Nothing that holds training progress (a checkpoint, metrics, the options of an interrupted run) is
  deleted unless the caller passes `force`.
- `commit` never loses a result: the temporary files of killed writes are removed first (they are never
  renamed into ``DIR``), an existing ``DIR`` is renamed aside, the new one renamed in, and only then is
  the old one deleted; a kill between the two renames leaves both folders on disk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PARTIAL = ".partial"
LOCK = "lock"
REPORT = "report.json"
MODEL_FILE = "model.pt"
PACKED_FILE = "model.bcz"
POSTERIOR_FILE = "posterior.pt"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINETUNE_CHECKPOINT = "finetune.pt"  # in DIR.partial while the pruned posterior is fine-tuned
FINETUNE_METRICS = "finetune_metrics.jsonl"
MEAN_CHECKPOINT = "finetune_mean.pt"  # then while the kept posterior means are fine-tuned (the noise off)
MEAN_METRICS = "finetune_mean_metrics.jsonl"
OPTIONS = "options.json"  # in DIR.partial only: the options the run was started with

#: files of an unfinished run that hold its training progress (a resume continues from them): never deleted
#: without `force`
PROGRESS = (CHECKPOINT, CHECKPOINT + ".prev", FINETUNE_CHECKPOINT, FINETUNE_CHECKPOINT + ".prev", MEAN_CHECKPOINT,
            MEAN_CHECKPOINT + ".prev")
#: files of the working folder that the finished folder does not keep (report.json holds the options)
DISCARDED = (CHECKPOINT, CHECKPOINT + ".prev", FINETUNE_CHECKPOINT, FINETUNE_CHECKPOINT + ".prev", MEAN_CHECKPOINT,
             MEAN_CHECKPOINT + ".prev", OPTIONS)


class RunError(RuntimeError):
    """A run that cannot start or finish; the message says why in one line."""


def work_dir(run_dir: Path) -> Path:
    """The working folder of a run: ``DIR.partial`` for ``DIR`` (a path already naming it is returned as is)."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.name.endswith(PARTIAL) else run_dir.with_name(run_dir.name + PARTIAL)


def final_dir(path: Path) -> Path:
    """The finished folder of a run named by `path` (``DIR`` for ``DIR.partial``)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(PARTIAL)) if path.name.endswith(PARTIAL) else path


def check_out(out: str | os.PathLike, flag: str = "--out") -> Path:
    """The output folder `out` as a Path, refused where it names no new folder of its own.

    Refused: an empty name, ``.``/``..``/``/`` (no folder name), a name ending in ``.partial`` (reserved for
    working folders, so that an output and a working folder can never be the same), an existing file.
    """
    text = os.fspath(out)
    if not str(text).strip():
        raise RunError(f"{flag} is empty: give the name of the run folder to write (e.g. runs/lenet300)")
    path = Path(text)
    if path.name in ("", ".", "..") or Path(os.path.normpath(text)).name in ("", ".", ".."):
        raise RunError(f"{flag} {text!r} names no folder of its own (a run is written into a new folder): "
                       "give a folder name, e.g. runs/lenet300")
    if path.name.endswith(PARTIAL):
        raise RunError(f"{flag} {text}: names ending in {PARTIAL} are reserved for the working folders of runs; "
                       f"choose another name (a run written to DIR works in DIR{PARTIAL})")
    if path.exists() and not path.is_dir():
        raise RunError(f"{flag} {text} is a file, not a folder")
    return path


def same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name the same folder (after resolving links and '..')."""
    return Path(os.path.abspath(a)).resolve() == Path(os.path.abspath(b)).resolve()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def lock_holder(folder: Path) -> int | None:
    """The pid of the process holding the lock on `folder` (a working folder), or None if none holds it."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or -1
    except OSError:  # no flock here: the pid in the file says whether its writer still runs
        pid = _read_pid(fd)
        return pid if pid is not None and pid != os.getpid() and _pid_alive(pid) else None
    finally:
        os.close(fd)
    return None


def refuse_in_use(out: str | os.PathLike) -> None:
    """Refuse at once (before any data is loaded) an output whose working folder another writer holds."""
    work = work_dir(Path(out))
    pid = lock_holder(work)
    if pid is not None:
        raise _in_use(work, pid)


@dataclass
class FolderLock:
    """An exclusive lock on a working folder, held through an open file descriptor of its `lock` file."""

    path: Path
    fd: int | None = None

    def release(self) -> None:
        """Drop the lock (the file stays: a later writer locks the same file)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _in_use(folder: Path, pid: int | None) -> RunError:
    who = f"process {pid}" if pid and pid > 0 else "another process"
    if pid == os.getpid():
        who += " (this one)"
    return RunError(f"{folder} is in use by {who}, which is writing this run; wait for it to end, stop it, "
                    "or choose another --out")


def lock_folder(folder: Path) -> FolderLock:
    """Lock the working folder `folder` (which exists) for this process, or raise RunError naming the holder."""
    path = Path(folder) / LOCK
    for _ in range(3):  # the folder may be renamed (finished) between our open and our lock: then try again
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunError(f"cannot lock {folder}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise _in_use(folder, pid) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise RunError(f"cannot lock {folder}: {exc.strerror or exc}") from exc
            pid = _read_pid(fd)  # no flock on this file system: a pid that still runs holds the folder
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                os.close(fd)
                raise _in_use(folder, pid) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return FolderLock(path, fd)
    raise RunError(f"cannot lock {folder}: it keeps being moved by another process")


def remove_temps(folder: Path) -> list[str]:
    """Remove the temporary files (``.NAME.*.tmp``) that killed writes left in `folder`; return their names.

    Only the holder of the folder's lock calls this: temporary files are never read, and no other writer runs.
    """
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def progress_files(folder: Path) -> list[str]:
    """The files of `folder` (a working folder) that hold an unfinished run's progress."""
    return [name for name in PROGRESS if (Path(folder) / name).is_file()]


def finished_in_place(folder: Path) -> bool:
    """Whether `folder` holds a complete result whose move into place was interrupted (a report and no checkpoint)."""
    folder = Path(folder)
    return (folder / REPORT).is_file() and not any((folder / name).is_file() for name in PROGRESS)


@dataclass
class RunFolder:
    """A run's output folder `final`, its working folder `work`, and the lock this process holds on `work`.

    `interrupted_move`: `work` already holds the complete result of a run whose final rename was interrupted
    (only with `resume`): `commit` completes it.
    """

    final: Path
    work: Path
    lock: FolderLock | None = None
    interrupted_move: bool = False
    created: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Drop the lock (the process ending drops it too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self) -> None:
        """Remove the working folder of a command that failed and cannot be resumed (prune, finetune), unlock."""
        if self.lock is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        self.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def prepare(out: str | os.PathLike, *, resume: bool, force: bool, lock: bool = True) -> RunFolder:
    """Check that `out` can be written, make and lock its working folder ``OUT.partial``; return the RunFolder.

    - `out` must name a folder of its own (`check_out`); an existing one is replaced (at `commit`) only with
      `force`.
    - `resume`: ``OUT.partial`` must hold a checkpoint (or a complete result whose move was interrupted).
    - Otherwise an ``OUT.partial`` that holds an interrupted run's progress is refused unless `force`, which
      empties it; leftovers that hold no progress are removed.
    - `lock=False` (the non-zero ranks of a data-parallel run, which share rank 0's folder): no lock, nothing
      made or removed.

    The lock is taken before anything in ``OUT.partial`` is touched, so a second writer is refused before it
    can harm the first. Temporary files of killed writes are removed once the lock is held.
    """
    final = check_out(out)
    work = work_dir(final)
    if final.exists() and not force:
        raise RunError(f"output directory {final} already exists; choose another or pass --force")
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)  # e.g. runs/ on a fresh checkout
    except OSError as exc:
        raise RunError(f"cannot write output directory {final}: cannot create {parent} ({exc.strerror or exc})") from exc
    if not os.access(parent, os.W_OK):
        raise RunError(f"cannot write output directory {final}: parent {parent} is not writable")
    if resume and not work.is_dir():
        raise RunError(f"nothing to resume: no checkpoint at {work / CHECKPOINT}")
    folder = RunFolder(final, work)
    if not lock:  # (read-only: the same refusals as the writer's, so that no process waits for a writer that quit)
        has_checkpoint = any((work / name).is_file() for name in PROGRESS[:2])
        if resume and not has_checkpoint and not finished_in_place(work):
            raise RunError(f"nothing to resume: no checkpoint at {work / CHECKPOINT}")
        if not resume and not force and progress_files(work):
            raise RunError(f"{work} holds an interrupted run ({', '.join(progress_files(work))}): continue it with "
                           "--resume, or pass --force to discard it and start afresh")
        return folder
    folder.created = not work.exists()
    try:
        work.mkdir(exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot write output directory {final}: cannot create {work} ({exc.strerror or exc})") from exc
    folder.lock = lock_folder(work)
    try:
        remove_temps(work)
        if resume:
            has_checkpoint = (work / CHECKPOINT).is_file() or (work / (CHECKPOINT + ".prev")).is_file()
            folder.interrupted_move = not has_checkpoint and finished_in_place(work)
            if not has_checkpoint and not folder.interrupted_move:
                raise RunError(f"nothing to resume: no checkpoint at {work / CHECKPOINT}")
        else:
            held = progress_files(work)
            if held and not force:
                raise RunError(f"{work} holds an interrupted run ({', '.join(held)}): continue it with --resume, "
                               "or pass --force to discard it and start afresh")
            if finished_in_place(work) and not force:
                raise RunError(f"{work} holds the complete result of a run whose final move was interrupted: "
                               "`compress --resume` moves it into place; or pass --force to discard it")
            for entry in work.iterdir():
                if entry.name != LOCK:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    except BaseException:
        if folder.created:
            shutil.rmtree(work, ignore_errors=True)
        folder.release()
        raise
    return folder


def _aside(final: Path) -> Path:
    """Where `commit` keeps the folder it replaces until the new one is in place (hidden, unique to the process)."""
    return final.with_name(f".{final.name}.replaced.{os.getpid()}")


def commit(folder: RunFolder) -> None:
    """Move the complete working folder into place: ``DIR.partial`` becomes ``DIR`` in one rename.

    Before it: temporary files of killed writes and the files the finished folder does not keep
    (`DISCARDED`) are removed. An existing ``DIR`` (allowed by `prepare` with `force`) is renamed aside
    first and deleted only once the new one is in; if the second rename fails, the old one is put back.
    """
    work, final = folder.work, folder.final
    remove_temps(work)
    for name in DISCARDED:
        (work / name).unlink(missing_ok=True)
    aside = None
    if final.exists():
        aside = _aside(final)
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    try:
        os.replace(work, final)
    except BaseException:
        if aside is not None and not final.exists():
            os.replace(aside, final)
        raise
    (final / LOCK).unlink(missing_ok=True)
    folder.release()
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


__all__ = ["CHECKPOINT", "FINETUNE_CHECKPOINT", "FINETUNE_METRICS", "LOCK", "MEAN_CHECKPOINT", "MEAN_METRICS", "METRICS",
           "MODEL_FILE", "OPTIONS", "PACKED_FILE", "PARTIAL", "POSTERIOR_FILE", "REPORT", "FolderLock", "RunError",
           "RunFolder", "check_out", "commit", "final_dir", "lock_folder", "lock_holder", "prepare", "refuse_in_use",
           "remove_temps", "same_folder", "work_dir"]
