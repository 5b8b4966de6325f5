"""One writer per output: a lock file naming its holder, and interrupts held back while a result is written.

``OutputLock(folder)`` creates ``folder/.vggkit.lock`` with ``O_CREAT | O_EXCL`` (the holder's pid,
host, boot, process start time, start date and command line) and removes it when released. A second
writer is refused with one ``OutputBusyError`` line naming the holder; the lock of a process that is no
longer running on this machine (gone, a zombie, its pid reused, or the machine rebooted) is taken over
with one warning. ``deferred_interrupts`` holds SIGINT and SIGTERM back while the files of one result
are written, so that an interrupt leaves all of them new or all of them as they were.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .paths import writable_folder

try:
    import fcntl
except ImportError:  # Windows: takeovers are not serialised between takers (two would rarely race)
    fcntl = None

LOCK_NAME = ".vggkit.lock"

UNREADABLE_GRACE_S = 2.0  # a lock file is created empty and then filled: an empty one younger than this is in flight

_TAKE_ATTEMPTS = 50  # each attempt takes the lock, refuses, or removes one stale lock: a bound, not a timeout


class OutputBusyError(RuntimeError):
    """Another process holds the output: the message names it (pid, host, command, start) and what to do."""

    def __init__(self, message: str, holder: "Holder | None" = None) -> None:
        super().__init__(message)
        self.holder = holder


def _boot_id() -> str:
    try:  # changes at every boot: a lock from before a reboot is stale whatever its pid
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) from /proc, or None where /proc has no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def _command_line() -> str:
    """This process's command as typed: ``vggkit train ...`` or ``python -m vggkit.cli train ...``."""
    argv = list(getattr(sys, "orig_argv", sys.argv)) or ["python"]
    if len(argv) > 1 and Path(argv[1]).name == "vggkit":  # the console script: its interpreter adds nothing
        argv = argv[1:]
    argv[0] = Path(argv[0]).name
    return _one_line(shlex.join(argv))


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` fit for a one-line message: control characters (a ``python -c`` script's newlines) as spaces."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock file."""

    pid: int
    host: str
    boot: str
    process_start: int | None
    started: str  #: local time, ISO 8601 to the second
    command: str

    @classmethod
    def this_process(cls) -> "Holder":
        stat = _process_stat(os.getpid())
        return cls(os.getpid(), socket.gethostname(), _boot_id(), stat[1] if stat else None,
                   time.strftime("%Y-%m-%dT%H:%M:%S"), _command_line())

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """The holder in a lock file's bytes, or None for an empty or foreign file."""
        try:
            fields = json.loads(data.decode("utf-8"))
            return cls(int(fields["pid"]), str(fields["host"]), str(fields.get("boot", "")),
                       fields.get("process_start"), str(fields.get("started", "?")), str(fields.get("command", "?")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def running(self) -> bool:
        """Whether this holder still runs; a holder on another machine is taken to (it cannot be checked)."""
        if self.host != socket.gethostname():
            return True
        if self.pid <= 0:
            return False  # not a process (kill(0) would test our own process group)
        boot = _boot_id()
        if self.boot and boot and self.boot != boot:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, someone else's
        stat = _process_stat(self.pid)
        if stat is None:
            return True  # no /proc (macOS): the signal test is all there is
        state, start = stat
        return state != "Z" and (self.process_start is None or start == self.process_start)

    def describe(self) -> str:
        where = "this machine" if self.host == socket.gethostname() else self.host
        return f"process {self.pid} on {where} (`{_one_line(self.command)}`, started {_one_line(self.started)})"


class OutputLock:
    """The lock of one output (a folder, or with ``name`` one file in it): ``with OutputLock(folder): ...``.

    ``enabled=False`` (a torchrun rank other than 0) makes it a no-op, so exactly one process of a job
    holds it. ``fix``: the advice ending the busy message, e.g. "choose another --output";
    ``writable_fix``: the one ending the message for a folder that cannot be written.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME, enabled: bool = True,
                 fix: str = "choose another --output", what: str | None = None,
                 writable_fix: str = "choose a writable folder") -> None:
        self.folder, self.enabled, self.fix, self.writable_fix = Path(folder), enabled, fix, writable_fix
        self.path = self.folder / name
        self.what = what or f"The output folder {self.folder}"
        self.holder: Holder | None = None
        self._inode: int | None = None

    @classmethod
    def for_file(cls, path: str | os.PathLike, fix: str = "choose another output file", **options) -> "OutputLock":
        """The lock of one output file: ``.NAME.vggkit.lock`` beside it (other files in its folder stay free)."""
        path = Path(path)
        return cls(path.parent, name=f".{path.name}{LOCK_NAME}", fix=fix, what=str(path),
                   writable_fix="choose a writable path", **options)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> "OutputLock":
        """Create the folder if needed and take the lock, or raise ``OutputBusyError`` at once."""
        if not self.enabled or self._inode is not None:
            return self
        writable_folder(self.folder, fix=self.writable_fix)
        for _ in range(_TAKE_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            except FileNotFoundError:  # the folder was removed meanwhile
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            self.holder = Holder.this_process()
            try:
                os.write(fd, json.dumps(asdict(self.holder)).encode("utf-8") + b"\n")
                self._inode = os.fstat(fd).st_ino
            except BaseException as error:
                os.unlink(self.path)  # a half-written lock of ours would be judged stale, then taken
                from .atomic import DiskFullError, is_disk_full  # imports torch: not at the CLI's start

                if is_disk_full(error):
                    raise DiskFullError(self.path, 4096, self.fix) from None
                raise
            finally:
                os.close(fd)
            return self
        raise OutputBusyError(f"{self.what} changed hands {_TAKE_ATTEMPTS} times while vggkit tried to take it; "
                              f"another program keeps creating {self.path}. Stop it, or {self.fix}.")

    def _clear_if_stale(self) -> None:
        """Raise ``OutputBusyError`` for a live holder; remove the lock of a dead one (one warning)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return  # released meanwhile: try again
        except OSError as error:
            raise OutputBusyError(f"{self.path} is not a vggkit lock file ({error.strerror}); remove it or "
                                  f"{self.fix}.") from None
        try:
            if fcntl is not None:
                # Serialises takers (holders never flock): whoever judges a lock stale removes that very file.
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino != os.stat(self.path, follow_symlinks=False).st_ino:
                return  # replaced meanwhile: judge the new one
            holder = Holder.parse(os.read(fd, 1 << 16))
            if holder is None and time.time() - os.fstat(fd).st_mtime < UNREADABLE_GRACE_S:
                time.sleep(0.05)  # being written by a process that has just created it
                return
            if holder is not None and holder.running():
                raise OutputBusyError(self._busy_message(holder), holder)
            os.unlink(self.path)
        except FileNotFoundError:
            return
        finally:
            os.close(fd)
        who = holder.describe() if holder else "a process that died while creating it"
        warnings.warn(f"Took over {self.path}: it was held by {who}, which is no longer running.", stacklevel=4)

    def _busy_message(self, holder: Holder) -> str:
        if holder.host == socket.gethostname():
            wait = f"Wait for it to end (or stop it: kill {holder.pid})"
        else:
            wait = f"Wait for it to end (if it is gone, delete {self.path})"
        return f"{self.what} is in use by {holder.describe()}. {wait}, or {self.fix}."

    def release(self) -> None:
        """Remove the lock if it is still this process's own (a forked worker never removes its parent's)."""
        if self._inode is None or self.holder is None or self.holder.pid != os.getpid():
            return
        try:
            if os.stat(self.path, follow_symlinks=False).st_ino == self._inode and \
                    Holder.parse(self.path.read_bytes()) == self.holder:
                os.unlink(self.path)
        except OSError:
            pass  # already gone (or the folder with it): nothing of ours is left to remove
        self._inode = None


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a block (the writes of one result) and deliver them after it.

    Python runs signal handlers in the main thread only; elsewhere (or with a handler set outside
    Python, which could not be put back) the block runs as it is.
    """
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    caught: list[int] = []
    for number in signals:
        signal.signal(number, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)  # as if it came now: KeyboardInterrupt, the CLI's SIGTERM, or the default
