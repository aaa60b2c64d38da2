"""Loads the C++ per-step loops of the Mogrifier fast path (cpu.cpp), compiled at first use.

`extension()` returns the compiled module, or None where it cannot be used; fast.py then runs its
Python loops (same results, 1.3-1.6x slower at n=256). It cannot be used when:

* it is disabled: `enabled = False` here, or the environment variable LMCORE_MOGRIFIER_CPP=0;
* the machine or the PyTorch build does not fit: it needs Linux on x86-64 with AVX2 and PyTorch built
  with MKL and OpenMP (the pip wheels for Linux x86-64 are), because it calls MKL's packed GEMM inside
  PyTorch and uses PyTorch's OpenMP threads;
* the build fails (no C++ compiler, no ninja): one RuntimeWarning.

The first use compiles with `torch.utils.cpp_extension.load` (~45 s on 2 cores) into torch's extensions
directory (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR); later processes only load the library
(~0.1 s). Loads and builds are serialised by an flock, so Ray trials starting together compile once, and a
process killed while loading (a stopped trial, the OOM killer) never blocks the next: torch's own lock is a plain
file that such a process leaves behind, after which every load would wait forever. `./dev setup` builds it ahead of
time. The name carries the Python and torch versions and a hash of this checkout's path: another Python, another
torch or another checkout builds its own copy.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

enabled: bool = os.environ.get("LMCORE_MOGRIFIER_CPP", "1") not in ("0", "false", "False", "")

_SOURCE = Path(__file__).with_name("cpu.cpp")
# The build folder is named after the torch version and this checkout: torch's build file records the source's
# path, so two checkouts sharing one folder would rebuild (~45 s) each time the other had loaded it.
_NAME = (f"lmcore_mogrifier_cpu_py{sys.version_info.major}{sys.version_info.minor}_"
         f"torch{torch.__version__.split('+')[0].replace('.', '_')}_"
         f"{hashlib.sha1(str(_SOURCE.resolve()).encode()).hexdigest()[:8]}")
_lock = threading.Lock()
_module = None
_failed = False


def unsupported_reason() -> str | None:
    """Why this machine or PyTorch build cannot run the C++ loops, or None if it can."""
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return f"needs Linux on x86-64 (this is {sys.platform}/{platform.machine()})"
    if not (torch.backends.mkl.is_available() and torch.backends.openmp.is_available()):
        return "needs PyTorch built with MKL and OpenMP"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs a CPU with AVX2 (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"
    return None


def extension():
    """The compiled extension module, or None (disabled, unsupported or the build failed)."""
    global _module, _failed
    if not enabled or _failed:
        return None
    if _module is not None:
        return _module
    with _lock:
        if _module is None and not _failed:
            if unsupported_reason() is not None:
                _failed = True  # silently: the Python loops are the path for such machines
                return None
            try:
                from torch.utils import cpp_extension

                folder = build_directory()
                with _only_loader(folder):
                    _module = cpp_extension.load(
                        name=_NAME,
                        sources=[str(_SOURCE)],
                        extra_cflags=["-O3", "-fopenmp", "-mavx2", "-mfma"],
                        build_directory=str(folder),
                        verbose=False,
                    )
            except Exception as exc:  # no compiler, no ninja, build error: the Python loops still work
                _failed = True
                message = str(exc).strip()
                warnings.warn(
                    f"lmcore: could not build the C++ Mogrifier loops ({type(exc).__name__}: "
                    f"{message.splitlines()[-1] if message else repr(exc)}); using the slower Python fast path",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _module


def build_directory() -> Path:
    """Where the extension is built and cached: $TORCH_EXTENSIONS_DIR, else torch's default root."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / _NAME


@contextmanager
def _only_loader(folder: Path):
    """Holds an exclusive flock on folder/lmcore.lock, which the kernel releases when its holder dies, however it
    dies. Every loader takes it before torch's lock file, so a torch lock file found while holding it was left by a
    killed process and is removed."""
    import fcntl  # Linux only, like the extension

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lmcore.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        yield
