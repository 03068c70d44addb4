"""Document parsing in worker processes, with a per-file time limit and a memory limit.

The third-party document parsers (unstructured, pdfminer, PDFium, python-docx/pptx, lxml, python-markdown) run
on hostile input. In a thread of the ingest process, one that loops or balloons stalls or kills the whole ingest.
Here each document is parsed by ``ingest.parsers.parse_file`` in a worker process instead:

- **time**: the caller waits at most ``timeout_s`` for the elements; past that the worker is killed (SIGKILL) and
  the file is refused with "parsing took longer than N s (ingest.parse_timeout_s)";
- **memory**: the worker's address space is capped (``RLIMIT_AS``) at its idle size plus ``memory_mb``, so an
  allocation beyond it fails inside the worker (MemoryError, or a parser that dies on a failed ``malloc``); the
  file is refused with a reason that names ``ingest.parse_memory_mb`` and the worker is replaced (the idle size
  is read from /proc: where there is none, the time limit still holds but no memory cap is set);
- **crashes**: a worker that dies (a segfault in a C parser, an outside kill) is replaced and the file is tried once
  more in a fresh worker before it is refused; the other files of the batch never notice.

Workers are kept alive between files and ingests: one pool per process (``shared_pool``), started on the first
document (or in the background by ``ParserPool.prestart`` when an ingest knows documents are coming), restarted
after a kill. They come from a ``forkserver`` (``spawn`` where there is none): a clean
process that imported the parser modules once, so a new worker is a cheap fork of it and never a fork of the
ingest process with its torch/OpenMP threads. The workers die with their parent: the forkserver exits when the
process that started it goes away (its end of a pipe closes), and on Linux each worker asks the kernel to SIGKILL
it when its parent, the forkserver, dies (``PR_SET_PDEATHSIG``), even while a parser holds the GIL.

Images (Pillow under the pixel limits) and plain text are cheap and bounded, and are parsed in the ingest process.
"""

from __future__ import annotations

import gc
import io
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ingest.elements import Element, ParseOptions
from mmrag.errors import BadInputError, MmragError

logger = logging.getLogger(__name__)

# The kinds parsed in a worker: those that go through unstructured, pdfminer/PDFium, python-docx/pptx, lxml or
# python-markdown.
ISOLATED_KINDS = frozenset({"pdf", "docx", "pptx", "html", "markdown"})

# Imported once by the forkserver, so every worker forked from it starts with them loaded (about 3 s and 400 MB
# of which most pages stay shared between the workers); torch is kept out first (see ingest._torchless).
PRELOAD = (
    "ingest._torchless",
    "ingest.parsers", "ingest.parsers.pdf", "ingest.parsers.office", "ingest.parsers.web", "ingest.parsers.plain",
    "unstructured.partition.pdf", "unstructured.partition.docx", "unstructured.partition.pptx",
    "unstructured.partition.html", "unstructured.partition.md", "unstructured.partition.text",
    "pypdfium2", "docx", "pptx", "bs4", "lxml.html", "markdown", "spacy",
)
STARTUP_TIMEOUT_S = 300.0  # a worker that has not loaded its parsers by then is reported, not waited for
RETRIES_AFTER_DEATH = 1  # a file whose worker died is tried once more in a fresh one
_WARM_UP = b"<html><body><h1>Warm up</h1><p>The parsers of this worker are loaded.</p></body></html>"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ParseLimits:
    """Per-file limits of isolated parsing (from ``ingest.parse_timeout_s`` and ``ingest.parse_memory_mb``)."""

    timeout_s: float = 120.0
    memory_mb: int = 2048  # 0: no memory limit


# ---------------------------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------------------------


def _die_with_parent(owner: int) -> None:
    """Linux: SIGKILL this process when its parent dies; exit now when the parent or the ingest process that
    asked for this worker (``owner``) is already gone."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        pass
    if os.getppid() != parent:
        os._exit(1)


def _address_space_bytes() -> int | None:
    """This process's virtual memory size (VmSize), or None where /proc does not tell."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _MemoryCap:
    """Caps the worker's address space at its idle size plus a per-job allowance (the soft RLIMIT_AS only, so
    the next job may set another allowance)."""

    def __init__(self) -> None:
        try:
            import resource
        except ImportError:  # pragma: no cover - not POSIX
            self.resource = None
            return
        self.resource = resource
        self.base = _address_space_bytes()
        self.hard = resource.getrlimit(resource.RLIMIT_AS)[1]

    def set(self, memory_mb: int) -> None:
        if self.resource is None or self.base is None:
            return
        soft = self.resource.RLIM_INFINITY if memory_mb <= 0 else self.base + memory_mb * 1024 * 1024
        if self.hard != self.resource.RLIM_INFINITY and (soft == self.resource.RLIM_INFINITY or soft > self.hard):
            soft = self.hard
        self.resource.setrlimit(self.resource.RLIMIT_AS, (soft, self.hard))


def _drop_forkserver_fds() -> None:
    """Close what a forkserver child inherits to start processes of its own: its copy of the write end of the
    pipe whose closing tells the forkserver that the ingest process is gone, and the resource tracker's. A worker
    starts no process, and while it held them a busy worker kept the forkserver (and with it itself) alive after
    a SIGKILLed ingest until its parse ended."""
    from multiprocessing import forkserver, resource_tracker

    server = getattr(forkserver, "_forkserver", None)
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    for holder, name in ((server, "_forkserver_alive_fd"), (tracker, "_fd")):
        fd = getattr(holder, name, None)
        if isinstance(fd, int):
            try:
                os.close(fd)
            except OSError:
                pass
            setattr(holder, name, None)


def _worker_main(conn: Connection, owner: int) -> None:
    """Load the parsers, then parse the jobs that arrive on ``conn`` until it closes.

    A job is ``(path, data, options, memory_mb)``; the answer is ``("ok", elements)``, ``("bad", reason)`` for a
    refused file, or ``("memory", reason)`` after which the worker exits (its heap is not trusted any more).
    """
    _drop_forkserver_fds()
    _die_with_parent(owner)
    # unstructured prints a usage notice once per process that parses: the pool's owner shows it once for all
    # its workers (see ParserPool), instead of one banner per worker.
    os.environ["UNSTRUCTURED_DISABLE_NOTICE"] = "1"
    gc.freeze()  # the garbage collector leaves the forkserver's objects alone, so their pages stay shared
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the ingest, which stops its workers
    import importlib

    for name in PRELOAD:  # already loaded when forked from the forkserver; spawn imports them here
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from ingest.nlp import ensure_offline_nlp
    from ingest.parsers import parse_file

    ensure_offline_nlp()
    try:
        parse_file(Path("warm-up.html"), _WARM_UP, ParseOptions())
    except MmragError:  # pragma: no cover - the warm-up document parses
        pass
    cap = _MemoryCap()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            path, data, options, memory_mb = conn.recv()
        except (EOFError, OSError):
            return
        cap.set(memory_mb)
        try:
            answer: tuple[str, Any] = ("ok", parse_file(Path(path), data, options))
        except BadInputError as exc:
            memory = isinstance(exc.__cause__, MemoryError)
            answer = ("memory" if memory else "bad", str(exc))
        except MemoryError:
            answer = ("memory", "out of memory")
        except Exception as exc:  # noqa: BLE001 - parse_file wraps parser errors; report anything else
            answer = ("bad", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        del data
        try:
            conn.send(answer)
        except MemoryError:
            answer = ("memory", "out of memory while sending the elements back")
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return
        if answer[0] == "memory":
            return
        cap.set(0)


# ---------------------------------------------------------------------------------------------------------------
# The pool (in the ingest process)
# ---------------------------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, process_class: Any) -> None:
        parent, child = multiprocessing.Pipe(duplex=True)
        self.conn: Connection = parent
        self.process = process_class(target=_worker_main, args=(child, os.getpid()), name="mmrag-parse",
                                     daemon=True)
        started = time.perf_counter()
        self.process.start()
        child.close()
        try:
            ready = parent.poll(STARTUP_TIMEOUT_S)
            message = parent.recv() if ready else None
        except (EOFError, OSError):
            message = None
        if not message or message[0] != "ready":
            self.kill()
            reason = "did not start within" if message is None and self.process.exitcode is None else "failed in"
            raise MmragError(f"the document parser process {reason} its start-up ({_death(self.process)}): "
                             "check that `python -c 'import unstructured.partition.pdf'` works")
        self.startup_s = time.perf_counter() - started
        logger.debug("parse worker %d ready in %.2f s", self.process.pid, self.startup_s)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


def _death(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


try:  # POSIX: the forkserver's Popen, with the main-module entries left out (see _process_class)
    from multiprocessing import context as _mp_context
    from multiprocessing import forkserver as _mp_forkserver
    from multiprocessing import popen_forkserver as _mp_popen_forkserver
    from multiprocessing import reduction as _mp_reduction
    from multiprocessing import spawn as _mp_spawn
    from multiprocessing import util as _mp_util

    class _ForkserverPopen(_mp_popen_forkserver.Popen):
        def _launch(self, process_obj: Any) -> None:  # popen_forkserver.Popen._launch, main module left out
            prep_data = _mp_spawn.get_preparation_data(process_obj._name)
            prep_data.pop("init_main_from_path", None)
            prep_data.pop("init_main_from_name", None)
            buf = io.BytesIO()
            _mp_context.set_spawning_popen(self)
            try:
                _mp_reduction.dump(prep_data, buf)
                _mp_reduction.dump(process_obj, buf)
            finally:
                _mp_context.set_spawning_popen(None)
            self.sentinel, w = _mp_forkserver.connect_to_new_process(self._fds)
            parent_w = os.dup(w)
            self.finalizer = _mp_util.Finalize(self, _mp_util.close_fds, (parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = _mp_forkserver.read_signed(self.sentinel)

    class _ForkserverProcess(_mp_context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            return _ForkserverPopen(process_obj)
except (ImportError, AttributeError):  # pragma: no cover - no forkserver on this platform
    _ForkserverProcess = None  # type: ignore[assignment,misc]


def _process_class() -> Any:
    """The Process class workers are started with: a forkserver child (spawn where there is no forkserver) that
    does not import the main module of the ingest process.

    multiprocessing re-runs the parent's ``__main__`` script in every forkserver/spawn child, as if it were a
    library. A worker needs nothing from it, and a script without an ``if __name__ == "__main__":`` guard (or one
    that fixes its import path at the top, as the benchmarks do) would fail there or ingest again inside the
    worker. The forkserver's Popen is the standard library's, with the main-module entries left out of the data
    the child prepares itself from."""
    if _ForkserverProcess is None or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn").Process
    _mp_forkserver.set_forkserver_preload(list(PRELOAD))
    return _ForkserverProcess


def _show_parser_notice() -> None:
    """unstructured's usage notice, once per process that owns parse workers (the workers, which do the parsing,
    leave it out), shown as unstructured shows it: a banner on a terminal, else a log warning (which the CLI's
    quiet logging leaves out). ``UNSTRUCTURED_DISABLE_NOTICE=1`` hides it, as unstructured documents."""
    try:
        from unstructured._usage_notice import maybe_emit_usage_notice
    except ImportError:  # an unstructured version without this notice
        return
    try:
        maybe_emit_usage_notice()
    except Exception:  # noqa: BLE001 - best effort, as in unstructured
        pass


class ParserPool:
    """Up to ``size`` parse workers, each busy with one file at a time; thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._process_class = _process_class()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._count = 0  # workers alive, idle or busy
        self._cond = threading.Condition()
        self.started = 0  # workers started so far (restarts included)
        self.startup_s: list[float] = []
        _show_parser_notice()


    # -- workers ------------------------------------------------------------------------------------------------
    def _checkout(self) -> _Worker:
        with self._cond:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        self._busy.add(worker)
                        return worker
                    worker.kill()
                    self._count -= 1
                if self._count < self.size:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            worker = _Worker(self._process_class)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        with self._cond:
            self.started += 1
            self.startup_s.append(worker.startup_s)
            self._busy.add(worker)
        return worker

    def _checkin(self, worker: _Worker, keep: bool) -> None:
        if not keep:
            worker.kill()
        with self._cond:
            self._busy.discard(worker)
            if keep and self._count <= self.size:
                self._idle.append(worker)
            else:
                if keep:
                    worker.kill()
                self._count -= 1
            self._cond.notify()

    def prestart(self) -> None:
        """Start the missing workers in background threads, so that the first documents find them ready (their
        start-up imports the parsers: seconds). A start that fails is left to the parse that needs the worker,
        which then tries again and reports it."""
        with self._cond:
            missing = self.size - self._count

        def start() -> None:
            try:
                worker = self._checkout()
            except MmragError as exc:
                logger.debug("starting a parse worker in the background failed: %s", exc)
                return
            self._checkin(worker, keep=True)

        for _ in range(max(0, missing)):
            threading.Thread(target=start, name="mmrag-parse-start", daemon=True).start()

    def pids(self, *, busy: bool = False) -> list[int]:
        """Process ids of the idle workers, or of the busy ones (parsing a file now)."""
        with self._cond:
            return [w.pid for w in (self._busy if busy else self._idle) if w.pid is not None]

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()

    # -- parsing ------------------------------------------------------------------------------------------------
    def parse(self, path: Path, data: bytes, options: ParseOptions, limits: ParseLimits) -> list[Element]:
        """``parse_file(path, data, options)`` in a worker, within ``limits``; BadInputError with the reason."""
        for attempt in range(RETRIES_AFTER_DEATH + 1):
            worker = self._checkout()
            keep = False
            try:
                status, payload = self._run(worker, path, data, options, limits)
                keep = status in ("ok", "bad")
            finally:
                self._checkin(worker, keep)
            if status == "ok":
                return payload
            if status == "bad":
                raise BadInputError(payload)
            if status == "timeout":
                raise BadInputError(f"parsing took longer than {limits.timeout_s:g} s (ingest.parse_timeout_s)")
            if status == "memory":
                raise BadInputError(f"parsing needed more than the memory limit of {limits.memory_mb:,} MB "
                                    f"(ingest.parse_memory_mb): {payload}")
            logger.warning("the parser process died on %s (%s)%s", path, payload,
                           "; trying once more" if attempt < RETRIES_AFTER_DEATH else "")
        limit = (f", possibly at the memory limit of {limits.memory_mb:,} MB (ingest.parse_memory_mb)"
                 if limits.memory_mb > 0 else "")
        raise BadInputError(f"the parser process died ({payload}) on this file, twice{limit}")

    def _run(self, worker: _Worker, path: Path, data: bytes, options: ParseOptions,
             limits: ParseLimits) -> tuple[str, Any]:
        """("ok", elements) | ("bad", reason) | ("memory", detail) | ("timeout", None) | ("died", how)."""
        try:
            worker.conn.send((str(path), data, options, limits.memory_mb))
            if not worker.conn.poll(limits.timeout_s):
                worker.kill()
                logger.warning("killed the parser process on %s after %g s", path, limits.timeout_s)
                return "timeout", None
            return worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(5)
            return "died", _death(worker.process)


_pool: ParserPool | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def shared_pool(size: int) -> ParserPool:
    """This process's pool, created on first use (and again in a forked child); grown to ``size`` workers."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ParserPool(size)
            _pool_pid = os.getpid()
        elif size > _pool.size:
            with _pool._cond:
                _pool.size = size
                _pool._cond.notify_all()
        return _pool


def parse_isolated(path: Path, data: bytes, options: ParseOptions, limits: ParseLimits, *,
                   workers: int = 1) -> list[Element]:
    """Parse one document in this process's worker pool (``workers`` at most); BadInputError with a reason."""
    return shared_pool(workers).parse(path, data, options, limits)
