"""The files we read and write for a user, handled safely in one place.

Reading: a settings file (a run's `--config`, an experiment, a search space) is YAML read with the safe loader
(no tag can construct a Python object), within limits on size, nesting and aliases (a "billion laughs" file is
refused at once), with duplicate keys refused rather than the last silently winning, and `1e-3` read as the
float researchers mean. Errors name the file and the position, never echo its contents.

Writing: every file is written beside its target and renamed over it, so a reader (or a crash) never sees a
half-written checkpoint, table or cache entry.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

MAX_YAML_BYTES = 1 << 20  # 1 MiB: experiments and configs are a few hundred bytes
MAX_YAML_DEPTH = 32
MAX_YAML_ALIASES = 64
MAX_YAML_NODES = 100_000


class FileError(ValueError):
    """A file that cannot be read as one of ours; str() names the file and what is wrong."""


class LimitError(FileError):
    """YAML beyond the limits above (size, nesting, aliases, values): refused, never read."""


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader with limits, duplicate-key detection and YAML 1.2-style floats (`1e-3`)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._aliases = self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _LimitError(f"more than {MAX_YAML_ALIASES} aliases (*name)", self.peek_event().start_mark)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _LimitError(f"more than {MAX_YAML_NODES:,} values", self.peek_event().start_mark)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _LimitError(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key that is a list or mapping", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short_repr(key)}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _LimitError(yaml.YAMLError):
    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: str | os.PathLike, source: str | None = None) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; FileError (naming `source`, default the path) otherwise."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise FileError(f"{source}: no such file")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise FileError(f"{source}: {size:,} bytes is too large for a settings file (limit {MAX_YAML_BYTES:,})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileError(f"{source}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise FileError(f"{source}: cannot be read ({err.strerror})") from None
    tree = parse_yaml(text, source)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise FileError(f"{source}: expected a mapping of settings (key: value lines) at the top level")
    return tree


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file we wrote (a summary, a cache); FileError naming it when it cannot be read or is damaged."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileError(f"{path}: damaged (not the JSON this program writes)") from None
    except OSError as err:
        raise FileError(f"{path}: cannot be read ({err.strerror})") from None


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python values, with the limits above; FileError says where it went wrong, not what it read."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader is a SafeLoader
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or getattr(err, "context", None) or "cannot be parsed"
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        error = LimitError if isinstance(err, _LimitError) else FileError
        raise error(f"{source}: not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise LimitError(f"{source}: nested too deeply") from None


def parse_value(text: str, source: str = "value") -> Any:
    """A command-line value as YAML reads it (`4`, `1e-3`, `true`, `null`, `[a, b]`), within the limits of a
    file (LimitError, naming `source`); text YAML cannot parse stays text."""
    if len(text) > MAX_YAML_BYTES:
        raise LimitError(f"{source}: a value of {len(text):,} characters is too long")
    try:
        return parse_yaml(text, source) if text.strip() else text
    except LimitError:
        raise
    except FileError:
        return text


def printable(text: str) -> str:
    """`text` with its control characters (terminal escape sequences, newlines) written as Python escapes (`\\x1b`):
    a message echoing a value never lets it steer the user's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: error messages never echo a whole file or a huge value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- writing ---------------------------------------------------------------------------------------------

SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"))  # the kernel's views: nothing of ours is ever written there


def why_unwritable(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why files cannot be written at `path` (a file, or with `folder` a folder to write into, made if missing),
    as the end of a message naming it; None when they can. Creates nothing."""
    path = Path(path).expanduser().resolve()
    system = next((s for s in SYSTEM_FOLDERS if path == s or s in path.parents), None)
    if system is not None:
        return f"is inside {system}, a system folder"
    if path.is_dir() and not folder:
        return "is a folder"
    if path.exists() and folder and not path.is_dir():
        return "exists and is not a folder"
    if path.exists() and not folder and not path.is_file():
        return "exists and is not a regular file"
    above = path if folder else path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        return f"cannot be made: {above} is not a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"cannot be written: {above} is not writable by this user"
    if os.statvfs(above).f_flag & os.ST_RDONLY:
        return f"cannot be written: {above} is on a read-only filesystem"
    return None



def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`: readers see the old
    file or the whole new one, and processes writing the same file at once replace each other's result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache dir may be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy `source` to `target` atomically (e.g. last.pt -> best.pt)."""
    with open(source, "rb") as f:
        write_atomically(target, lambda out: shutil.copyfileobj(f, out, length=1 << 20))
