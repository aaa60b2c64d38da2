"""The one YAML reader and the atomic writers (lmcore/files.py)."""
from __future__ import annotations

import os

import pytest

from lmcore import files
from lmcore.config import parse_value


def write(tmp_path, text: str | bytes, name: str = "x.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_reads_a_mapping_with_researchers_floats(tmp_path):
    tree = files.read_yaml(write(tmp_path, "optim.lr: 1e-3\nmodel: {rounds: 5}\n"))
    assert tree == {"optim.lr": 0.001, "model": {"rounds": 5}}
    assert files.read_yaml(write(tmp_path, "", "empty.yaml")) == {}


@pytest.mark.parametrize("text, expected", [
    ("a: 1\na: 2\n", "duplicate key 'a'"),
    ("a: !!python/object/apply:os.system ['touch pwned']\n", "could not determine a constructor"),
    (b"a: \xff\xfe\n", "not UTF-8"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("a: [1, 2\n", "not valid YAML"),
    ("? [1, 2]\n: 3\n", "a key that is a list or mapping"),
    ("a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper"),
])
def test_malformed_files_are_one_message_naming_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(files.FileError) as err:
        files.read_yaml(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_alias_bombs_and_huge_files_are_refused_at_once(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12))
    with pytest.raises(files.FileError, match="aliases"):
        files.read_yaml(write(tmp_path, bomb))
    big = write(tmp_path, "a: " + "x" * (files.MAX_YAML_BYTES + 1), "big.yaml")
    with pytest.raises(files.FileError, match="too large"):
        files.read_yaml(big)


def test_errors_never_echo_the_contents_of_a_foreign_file(tmp_path):
    secret = "root:$6$secrethash:19000:0:99999:7:::\ndaemon: [unclosed: secret2\n"
    with pytest.raises(files.FileError) as err:
        files.read_yaml(write(tmp_path, secret, "shadow"))
    assert "secret" not in str(err.value)


def test_both_command_lines_read_values_alike():
    assert files.parse_value("1e-3") == 0.001 and parse_value("optim.lr", "1e-3") == 0.001
    assert files.parse_value("[a, b]") == ["a", "b"] and files.parse_value("a: [") == "a: ["
    with pytest.raises(ValueError, match="did you mean model.rounds"):
        parse_value("model.round", "3")


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "table.md"
    files.write_text(target, "old")
    with pytest.raises(RuntimeError):
        files.write_atomically(target, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("crash"))))
    assert target.read_text() == "old" and os.listdir(target.parent) == ["table.md"]
    files.copy_file(target, tmp_path / "copy.md")
    assert (tmp_path / "copy.md").read_text() == "old"


def test_printable_escapes_control_characters_only():
    assert files.printable("description=\x1b[31mred\x1b[0m\nnext é") == "description=\\x1b[31mred\\x1b[0m\\nnext é"


@pytest.mark.parametrize("path, folder, problem", [
    ("/dev/null", True, "exists and is not a folder"),
    ("/dev/null", False, "exists and is not a regular file"),  # a rename over it would replace the device
    ("/proc/results", True, "is inside /proc, a system folder"),
    ("/sys/out.yaml", False, "is inside /sys, a system folder"),
])
def test_why_unwritable_names_system_paths(path, folder, problem):
    assert files.why_unwritable(path, folder) == problem


def test_why_unwritable_in_a_users_tree(tmp_path):
    (tmp_path / "file").write_text("x")
    assert files.why_unwritable(tmp_path / "new" / "deeper", folder=True) is None  # made when written
    assert files.why_unwritable(tmp_path / "out.yaml") is None
    assert files.why_unwritable(tmp_path, folder=False) == "is a folder"
    assert files.why_unwritable(tmp_path / "file" / "x", folder=True) == f"cannot be made: {tmp_path / 'file'} is " \
                                                                         "not a folder"
    assert not list(tmp_path.glob("new"))  # nothing made


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes any folder")
def test_why_unwritable_names_a_folder_this_user_cannot_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert files.why_unwritable(locked / "results", folder=True) == f"cannot be written: {locked} is not writable " \
                                                                     "by this user"


def test_read_json_names_a_damaged_file(tmp_path):
    path = write(tmp_path, b"\x81\x00{", "summary.json")
    with pytest.raises(files.FileError, match=f"^{path}: damaged"):
        files.read_json(path)
    assert files.read_json(write(tmp_path, '{"a": 1}', "ok.json")) == {"a": 1}
