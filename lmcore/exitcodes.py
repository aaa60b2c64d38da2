"""The exit codes of both command lines (`python -m lmcore`, `tune.py`), decided once."""
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # a usable result: the run finished, or the study has a usable trial; check/report/compare succeeded
    ERROR = 1  # an unexpected error (a bug: the traceback is printed)
    BAD_INPUT = 2  # one message naming the file and field; nothing written, nothing launched
    NO_RESULT = 3  # finished without a usable result: the run diverged, or every trial errored or diverged
    INTERRUPTED = 130  # Ctrl-C: run the same command again to resume
