"""An engine core's console output: passed through, its last lines kept for a failed start.

vLLM's engine core and its workers are processes of their own that print to the
server's stdout and stderr. When a start fails, the front end learns only "Engine core
initialization failed. See root cause above", and the root cause (say, "Cannot find any
model weights") is a hundred lines up, in another process's traceback.

:class:`CoreOutput` gives the processes spawned during one launch their own pipes for
stdout and stderr (the process's descriptors 1 and 2 point at them only while the
launcher spawns, under its lock). A thread per pipe copies everything to where the
descriptors pointed before, unchanged, and keeps the last lines; it ends when every
process that holds the pipe has exited. :meth:`CoreOutput.root_cause` reads the first
exception line of those tracebacks that is not one of vLLM's "see above" wrappers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator

#: Lines kept per engine core (its two streams together): a start's tracebacks fit.
KEPT_LINES = 400

# vLLM prefixes its log lines: "(Worker pid=7538) ERROR 12-07 22:10:29 [file.py:953] ".
_PREFIX = re.compile(r"^(?:\([^)]*\) )?(?:[A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] )?")
# An exception's last line: "RuntimeError: ...", "torch.OutOfMemoryError: ...".
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (\S.*)$")
# vLLM's wrappers, which only point at the real cause.
_WRAPPERS = ("see root cause", "see stack trace", "see the stack trace", "root cause above")


class CoreOutput:
    """The console output of the processes one launch spawns (see the module's notes)."""

    def __init__(self, keep: int = KEPT_LINES) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._redirects: list[_Redirect] = []

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Processes started in this block write to this object's pipes (hold the spawn
        lock: descriptors 1 and 2 are the process's own). If the descriptors cannot be
        redirected (closed, say), the block runs with them untouched."""
        redirects: list[_Redirect] = []
        try:
            for fd in (1, 2):
                redirects.append(_Redirect(fd, self._keep))
        except OSError:
            for redirect in redirects:
                redirect.restore()
                redirect.release()
            yield
            return
        try:
            yield
        finally:
            for redirect in redirects:
                redirect.restore()
            self._redirects = redirects

    def _keep(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def lines(self) -> list[str]:
        """The last lines seen, oldest first."""
        with self._lock:
            return list(self._lines)

    def release(self) -> None:
        """The start is over: the pipes close once the processes holding them exit."""
        for redirect in self._redirects:
            redirect.release()

    def root_cause(self, timeout: float = 3.0) -> str | None:
        """After a failed start, its processes stopped: the first exception line of their
        output that is not a wrapper ("RuntimeError: Cannot find any model weights with
        ..."), or None. Waits up to ``timeout`` seconds for what they wrote to be read."""
        deadline = time.monotonic() + timeout
        for redirect in self._redirects:
            redirect.drain(max(0.0, deadline - time.monotonic()))
        for line in self.lines():
            match = _EXCEPTION.match(_PREFIX.sub("", line, count=1))
            if match is not None and not any(w in match.group(2).lower() for w in _WRAPPERS):
                return f"{match.group(1)}: {match.group(2).strip()}"
        return None


class _Redirect:
    """Descriptor ``fd`` pointed at a new pipe until :meth:`restore`; a thread copies the
    pipe to where ``fd`` pointed before, and hands ``keep`` each line."""

    def __init__(self, fd: int, keep: Callable[[str], None]) -> None:
        _flush(fd)
        self.fd = fd
        self._keep = keep
        self._saved = os.dup(fd)  # not inheritable: spawned processes get the pipe only
        try:
            self._read, write = os.pipe()
        except OSError:
            os.close(self._saved)
            raise
        try:
            os.dup2(write, fd)
        except OSError:
            for own in (self._saved, self._read, write):
                os.close(own)
            raise
        # Kept to write a mark after a failed start (everything before it has been read
        # once the mark is), until release(): the pipe ends when its last writer exits.
        self._write: int | None = write
        self._write_lock = threading.Lock()
        self._mark = f"\x00lylm-output-mark-{id(self)}".encode()
        self._marked = threading.Event()
        self._pump: threading.Thread | None = None

    def restore(self) -> None:
        """Point the descriptor back and start copying the pipe."""
        _flush(self.fd)
        os.dup2(self._saved, self.fd)
        self._pump = threading.Thread(target=self._copy, name=f"lylm-core-output-{self.fd}", daemon=True)
        self._pump.start()

    def drain(self, timeout: float) -> None:
        """Wait until everything written so far has been read (or ``timeout`` passes)."""
        with self._write_lock:
            if self._write is None:
                return
            with contextlib.suppress(OSError):
                os.write(self._write, self._mark + b"\n")
        self._marked.wait(timeout)

    def release(self) -> None:
        with self._write_lock:
            write, self._write = self._write, None
        if write is not None:
            os.close(write)

    def _copy(self) -> None:
        partial = b""
        try:
            while chunk := os.read(self._read, 65536):
                with contextlib.suppress(OSError):  # where the output went is gone: keep reading
                    _write_all(self._saved, chunk.replace(self._mark + b"\n", b""))
                *complete, partial = (partial + chunk).split(b"\n")
                for line in complete:
                    if line == self._mark:
                        self._marked.set()
                    else:
                        self._keep(line.decode("utf-8", "replace").rstrip("\r"))
                if len(partial) > 65536:  # no newline for long: keep what there is as a line
                    self._keep(partial.decode("utf-8", "replace"))
                    partial = b""
        except OSError:
            pass
        finally:
            if partial:
                self._keep(partial.decode("utf-8", "replace"))
            self._marked.set()
            os.close(self._read)
            os.close(self._saved)


def _flush(fd: int) -> None:
    stream = {1: sys.stdout, 2: sys.stderr}.get(fd)
    with contextlib.suppress(Exception):
        if stream is not None:
            stream.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
