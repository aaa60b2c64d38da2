"""The exit codes of both command lines (`python -m lmcore`, `tune.py`), decided once, and how they end."""
import functools
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0  # a usable result: the run finished, or the study has a usable trial; check/report/compare succeeded
    ERROR = 1  # an unexpected error (a bug: the traceback is printed)
    BAD_INPUT = 2  # one message naming the file and field; nothing written, nothing launched
    NO_RESULT = 3  # finished without a usable result: the run diverged, or every trial errored or diverged
    INTERRUPTED = 130  # Ctrl-C, or SIGTERM (`timeout`, a job scheduler, systemd, Kubernetes): run it again to resume
    CLOSED_PIPE = 141  # the reader of our output went away (`| head`): what a shell reports for SIGPIPE


def quiet_when_output_closes(main: Callable[..., int]) -> Callable[..., int]:
    """A command line's main, ending quietly when the reader of stdout goes away (`| head`): with CLOSED_PIPE
    if it had succeeded, else with its own code. Any other error, a broken pipe elsewhere included, is raised.

    Python ignores SIGPIPE, so without this a command piped into head ends with a BrokenPipeError traceback.
    """
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        code = ExitCode.OK
        try:
            try:
                code = main(*args, **kwargs)
            except SystemExit as done:  # --help or a bad command line, as argparse ends them
                code = done.code
            if sys.stdout is not None:  # None when started with stdout closed (`>&-`)
                sys.stdout.flush()  # here, not in the interpreter's last flush, which would raise unseen
        except BrokenPipeError:
            if not _reader_gone():
                raise
            _discard_stdout()
            return ExitCode.CLOSED_PIPE if code in (None, ExitCode.OK) else code
        return code
    return guarded


def sigterm_as_ctrl_c(main: Callable[..., int]) -> Callable[..., int]:
    """A command line's main, for which SIGTERM (what `timeout`, a job scheduler, systemd or Kubernetes send) is
    Ctrl-C: whatever handles SIGINT at that moment runs (Ray Tune's saves the study and ends the fit; Python's
    raises KeyboardInterrupt), so the command ends as interrupted, INTERRUPTED, saying how to resume. The previous
    SIGTERM handler is back when main returns. In the main thread only (signals are delivered there)."""
    @functools.wraps(main)
    def handled(*args, **kwargs) -> int:
        if threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _as_ctrl_c)
        try:
            return main(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return handled


def reclaim_sigterm(replaced: Any) -> None:
    """Put back the SIGTERM handler `replaced` was, if it was ours: a library that installs its own (ray.init: an
    exit with status 15, mid-run) must not undo sigterm_as_ctrl_c. Another program's handler is left alone."""
    if replaced is _as_ctrl_c and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_ctrl_c)


def _as_ctrl_c(signum: int, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored or left to the system: still an interruption
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll (Windows), no stdout, or one without a descriptor
        return False


def _discard_stdout() -> None:
    """Python's documented recipe: point stdout at devnull, so that the flush at exit cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
