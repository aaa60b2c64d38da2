"""lmcore.data: finding, verifying, downloading, tokenising and caching corpora. No network: downloads
come from a local HTTP server."""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pickle
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lmcore import data
from lmcore.data import DATASETS, DataError, Vocab, load_corpus

# A stand-in for PTB: tiny files under the real PTB file names, with their own checksums.
TINY_PTB = {
    "train": " the cat sat \n the dog sat <unk> \n",
    "valid": " the cat ran \n",
    "test": " a dog sat \n",
}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_tiny_ptb(folder, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in TINY_PTB.items():
        name = f"ptb.{split}.txt"
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
        else:
            (folder / name).write_text(text)
    return folder


@pytest.fixture
def http_server(tmp_path):
    """(base URL, folder it serves) of an HTTP server on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


@pytest.fixture
def tiny_ptb(monkeypatch, http_server):
    """Point the "ptb" registry entry at TINY_PTB: its checksums, and URLs on the local server (which
    serves nothing until a test writes the files there). Returns the served folder."""
    base_url, served = http_server
    splits = {
        split: data.SplitFile(f"ptb.{split}.txt", sha256(text), f"{base_url}/ptb.{split}.txt")
        for split, text in TINY_PTB.items()
    }
    monkeypatch.setitem(DATASETS, "ptb", dataclasses.replace(DATASETS["ptb"], splits=splits, vocab_size=None))
    return served


# --- the real data -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ptb", "wikitext-2"])
def test_real_counts(name, data_root, data_env):
    corpus = load_corpus(name, data_root)
    expected = DATASETS[name]
    for split in data.SPLITS:
        tokens = getattr(corpus, split)
        assert tokens.dtype == torch.long and tokens.dim() == 1
        assert len(tokens) == expected.splits[split].tokens
        assert tokens[-1] == corpus.vocab.eos_id  # every line ends with <eos>
    assert len(corpus.vocab) == expected.vocab_size
    assert int(corpus.train.max()) == len(corpus.vocab) - 1  # train-only vocabulary: every id used in train


def test_real_cache_is_fast_and_equal(data_root, data_env, monkeypatch):
    first = load_corpus("ptb", data_root)
    assert len(list((data_env / "corpora").glob("ptb-*.pt"))) == 1

    def no_tokenising(*args):
        raise AssertionError("re-tokenised although the corpus is cached")

    monkeypatch.setattr(data, "_tokenize", no_tokenising)
    second = load_corpus("ptb", data_root)
    assert second.vocab == first.vocab
    for split in data.SPLITS:
        assert torch.equal(getattr(second, split), getattr(first, split))


def test_real_checksum_mismatch(data_root, data_env, tmp_path):
    copy = shutil.copytree(data_root / "ptb", tmp_path / "copy" / "ptb")
    (copy / "ptb.valid.txt.gz").unlink(missing_ok=True)
    (copy / "ptb.valid.txt").write_bytes(gzip.decompress((data_root / "ptb" / "ptb.valid.txt.gz").read_bytes()) + b"x")
    with pytest.raises(DataError) as error:
        load_corpus("ptb", tmp_path / "copy")
    message = str(error.value)
    assert str(copy / "ptb.valid.txt") in message
    assert DATASETS["ptb"].splits["valid"].sha256 in message
    assert "LMCORE_DATA_DIR" in message


# --- finding files -------------------------------------------------------------------------------


def test_missing_offline_is_one_clear_error(data_env, monkeypatch, tmp_path):
    monkeypatch.setenv("LMCORE_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as error:
        load_corpus("ptb", tmp_path / "empty")
    message = str(error.value)
    for split in data.SPLITS:
        assert f"ptb.{split}.txt" in message
        assert DATASETS["ptb"].splits[split].sha256 in message
    assert str(tmp_path / "empty") in message and str(data_env) in message
    assert "LMCORE_DATA_DIR" in message and "LMCORE_OFFLINE" in message


def test_plain_and_gz_and_either_folder(tiny_ptb, data_env, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCORE_OFFLINE", "1")
    plain = load_corpus("ptb", write_tiny_ptb(tmp_path / "plain" / "ptb"))  # the dataset's own folder
    gz = load_corpus("ptb", write_tiny_ptb(tmp_path / "gz" / "ptb", gz=True).parent)  # the root above it
    assert plain.vocab == gz.vocab
    assert torch.equal(plain.train, gz.train) and torch.equal(plain.test, gz.test)
    assert plain.vocab.decode(plain.test) == ["<unk>", "dog", "sat", "<eos>"]


def test_explicit_data_dir_beats_env(data_env, monkeypatch, tmp_path):
    for name, word in [("env", "from_env"), ("arg", "from_arg")]:
        (tmp_path / name).mkdir()
        for split in data.SPLITS:
            (tmp_path / name / f"{split}.txt").write_text(f"{word}\n")
    monkeypatch.setenv("LMCORE_DATA_DIR", str(tmp_path / "env"))
    assert load_corpus("text").vocab.itos == ["from_env", "<eos>"]
    assert load_corpus("text", tmp_path / "arg").vocab.itos == ["from_arg", "<eos>"]


def test_data_dir_then_env_then_cache_all_searched(tiny_ptb, data_env, monkeypatch, tmp_path):
    # The README's order: data_dir, then $LMCORE_DATA_DIR, then the cache; a file missing from one is looked
    # for in the next, and the error's Fix line names both places.
    monkeypatch.setenv("LMCORE_OFFLINE", "1")
    write_tiny_ptb(tmp_path / "arg" / "ptb")
    write_tiny_ptb(tmp_path / "env" / "ptb")
    write_tiny_ptb(data_env / "ptb")
    (tmp_path / "arg" / "ptb" / "ptb.valid.txt").unlink()
    (tmp_path / "env" / "ptb" / "ptb.test.txt").unlink()
    (tmp_path / "env" / "ptb" / "ptb.valid.txt").unlink()
    monkeypatch.setenv("LMCORE_DATA_DIR", str(tmp_path / "env"))
    found = data.find_files("ptb", tmp_path / "arg")
    assert found["train"] == tmp_path / "arg" / "ptb" / "ptb.train.txt"
    assert found["test"] == tmp_path / "arg" / "ptb" / "ptb.test.txt"
    assert found["valid"] == data_env / "ptb" / "ptb.valid.txt"
    (tmp_path / "arg" / "ptb" / "ptb.test.txt").unlink()
    (data_env / "ptb" / "ptb.valid.txt").unlink()
    with pytest.raises(DataError) as error:
        load_corpus("ptb", tmp_path / "arg")
    message = str(error.value)
    assert "cannot find ptb.valid.txt (plain or .gz)" in message  # ptb.test.txt is still in the cache
    assert "data_dir" in message and "LMCORE_DATA_DIR" in message and "in that order" in message


@pytest.mark.parametrize("damage", ["one changed byte", "truncated", "random bytes"])
def test_damaged_gz_is_a_checksum_failure_naming_the_file(damage, tiny_ptb, data_env, monkeypatch, tmp_path):
    monkeypatch.setenv("LMCORE_OFFLINE", "1")
    folder = write_tiny_ptb(tmp_path / "gz" / "ptb", gz=True)
    path = folder / "ptb.valid.txt.gz"
    raw = bytearray(path.read_bytes())
    if damage == "one changed byte":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(os.urandom(len(raw)))
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as error:
        load_corpus("ptb", folder)
    message = str(error.value)
    assert str(path) in message and "checksum" in message
    assert DATASETS["ptb"].splits["valid"].sha256 in message


@pytest.mark.parametrize("damage", [b"", b"truncated", "half"])
def test_bad_corpus_cache_entry_is_rebuilt_with_one_warning(damage, tiny_corpus_dir, data_env, caplog):
    first = load_corpus("text", tiny_corpus_dir)
    [entry] = (data_env / "corpora").iterdir()
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2] if damage == "half" else damage)
    with caplog.at_level("WARNING", logger="lmcore"):
        again = load_corpus("text", tiny_corpus_dir)
    assert again.vocab == first.vocab and torch.equal(again.valid, first.valid)
    assert [r.getMessage() for r in caplog.records if str(entry) in r.getMessage()] == [
        f"{entry}: the cached tokenised corpus is unreadable; removed, rebuilding it"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmcore"):
        load_corpus("text", tiny_corpus_dir)  # rebuilt: read from the cache again, silently
    assert not caplog.records


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'ptb2'"):
        load_corpus("ptb2")


# --- downloading ---------------------------------------------------------------------------------


def test_download_verifies_and_caches(tiny_ptb, data_env, monkeypatch):
    write_tiny_ptb(tiny_ptb)
    corpus = load_corpus("ptb")
    assert corpus.vocab.decode(corpus.train) == "the cat sat <eos> the dog sat <unk> <eos>".split()
    assert sorted(p.name for p in (data_env / "ptb").iterdir()) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    # Now it is in the cache: no server and no network needed.
    for path in tiny_ptb.iterdir():
        path.unlink()
    monkeypatch.setenv("LMCORE_OFFLINE", "1")
    assert load_corpus("ptb").vocab == corpus.vocab


def test_download_with_wrong_content_errors(tiny_ptb, data_env):
    write_tiny_ptb(tiny_ptb)
    (tiny_ptb / "ptb.valid.txt").write_text(" the cat ran away \n")
    with pytest.raises(DataError) as error:
        load_corpus("ptb")
    message = str(error.value)
    assert DATASETS["ptb"].splits["valid"].url in message
    assert DATASETS["ptb"].splits["valid"].sha256 in message
    assert not (data_env / "ptb" / "ptb.valid.txt").exists()  # nothing unverified is kept


def test_failed_download_errors(tiny_ptb, data_env):
    with pytest.raises(DataError, match="ptb.train.txt failed"):  # the server has no files: 404
        load_corpus("ptb")


# --- the "text" dataset and the vocabulary -------------------------------------------------------


def test_text_dataset(tiny_corpus_dir, data_env):
    corpus = load_corpus("text", tiny_corpus_dir)
    assert corpus.name == "text"
    assert corpus.vocab.itos == ["the", "cat", "sat", "on", "mat", "<eos>", "dog", "<unk>", "ran"]
    assert len(corpus.train) == 14
    assert corpus.vocab.decode(corpus.valid) == "the cat ran <eos> <unk> <unk> sat <eos>".split()
    assert corpus.vocab.decode(corpus.test) == "the dog sat on the cat <eos>".split()


def test_text_unknown_word_without_unk(tiny_corpus_dir, data_env):
    (tiny_corpus_dir / "train.txt").write_text("the cat sat\n")
    with pytest.raises(DataError) as error:
        load_corpus("text", tiny_corpus_dir)
    assert "'ran'" in str(error.value) and str(tiny_corpus_dir / "valid.txt") in str(error.value)


def test_text_needs_a_data_dir(data_env):
    with pytest.raises(DataError, match="train.txt, valid.txt, test.txt"):
        load_corpus("text")


def test_concurrent_preparation(tiny_corpus_dir, data_env):
    results = [None] * 4

    def load(i):
        results[i] = load_corpus("text", tiny_corpus_dir)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None and r.vocab == results[0].vocab and torch.equal(r.valid, results[0].valid)
               for r in results)
    assert [p.suffix for p in (data_env / "corpora").iterdir()] == [".pt"]  # no temp files left


def test_vocab_round_trip():
    vocab = Vocab(["a", "<eos>", "<unk>"])
    assert Vocab(vocab.to_list()) == vocab == pickle.loads(pickle.dumps(vocab))
    assert vocab.eos_id == 1 and len(vocab) == 3
    assert vocab.encode(["a", "zzz", "<eos>"]) == [0, 2, 1]
    assert vocab.decode(torch.tensor([1, 0])) == ["<eos>", "a"]
    with pytest.raises(KeyError):
        Vocab(["a"]).encode(["b"])


# -- issue 25: files that are not text, and corpora larger than memory ---------------------------------------


def test_a_fifo_or_a_device_as_a_split_is_named_as_not_a_regular_file(tiny_corpus_dir, data_env):
    train = tiny_corpus_dir / "train.txt"
    train.unlink()
    os.mkfifo(train)  # a reader would wait forever for a writer
    with pytest.raises(DataError, match=r"train.txt: not a regular file \(a FIFO\)"):
        load_corpus("text", tiny_corpus_dir)
    train.unlink()
    train.symlink_to("/dev/zero")  # endless
    with pytest.raises(DataError, match=r"train.txt: not a regular file \(a link to a character device\)"):
        load_corpus("text", tiny_corpus_dir)


def test_a_corpus_is_tokenised_as_a_stream(tiny_corpus_dir, data_env):
    import tracemalloc

    line = " ".join(f"{'w' * 17}{i:03d}" for i in range(50)) + "\n"  # 21 bytes a word: ids take 8 of them
    (tiny_corpus_dir / "train.txt").write_text(line * 10_000 + " <unk>\n")
    size = (tiny_corpus_dir / "train.txt").stat().st_size
    tracemalloc.start()
    try:
        corpus = load_corpus("text", tiny_corpus_dir)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(corpus.train) == 510_002
    assert corpus.vocab.decode(corpus.train[:2]) == ["w" * 17 + "000", "w" * 17 + "001"]
    assert peak < 0.6 * size  # the ids, not the text (read whole, the text alone would be `size`)


def test_a_split_larger_than_the_memory_available_is_refused_naming_it_and_its_size(tiny_corpus_dir, data_env,
                                                                                      monkeypatch):
    size = (tiny_corpus_dir / "train.txt").stat().st_size
    monkeypatch.setattr(data, "available_memory", lambda: size - 1)
    with pytest.raises(DataError) as error:
        load_corpus("text", tiny_corpus_dir)
    assert str(error.value).startswith(f"{tiny_corpus_dir / 'train.txt'}: {size:,} bytes is more than the")
    assert not list((data_env / "corpora").glob("*"))  # nothing cached
