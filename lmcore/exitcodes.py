"""The exit codes of both command lines (`python -m lmcore`, `tune.py`), decided once, and how they end."""
import functools
import os
import sys
from collections.abc import Callable
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # a usable result: the run finished, or the study has a usable trial; check/report/compare succeeded
    ERROR = 1  # an unexpected error (a bug: the traceback is printed)
    BAD_INPUT = 2  # one message naming the file and field; nothing written, nothing launched
    NO_RESULT = 3  # finished without a usable result: the run diverged, or every trial errored or diverged
    INTERRUPTED = 130  # Ctrl-C: run the same command again to resume
    CLOSED_PIPE = 141  # the reader of our output went away (`| head`): what a shell reports for SIGPIPE


def quiet_when_output_closes(main: Callable[..., int]) -> Callable[..., int]:
    """A command line's main, ending quietly with CLOSED_PIPE when the reader of stdout goes away (`| head`).

    Python ignores SIGPIPE, so without this a command piped into head ends with a BrokenPipeError traceback.
    """
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            try:
                return main(*args, **kwargs)
            finally:  # flushed here, also after --help's SystemExit: the interpreter's last flush would raise unseen
                sys.stdout.flush()
        except BrokenPipeError:
            # Python's documented recipe: stdout now points at devnull, so the flush at exit cannot raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return ExitCode.CLOSED_PIPE
    return guarded
