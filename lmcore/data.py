"""The corpora: PTB, WikiText-2, or your own text.

Finding the files (data_dir, then $LMCORE_DATA_DIR, then the per-user cache, all searched in that order,
downloading into the cache when they are nowhere), checking each against its sha256, and turning them into
token ids exactly as pytorch/examples word_language_model does: every line split on whitespace with `<eos>`
appended, the vocabulary taken from the training split in order of first appearance. The tokenised corpus is cached,
keyed by the files' checksums, so a second load is a torch.load.
"""
from __future__ import annotations

import array
import gzip
import hashlib
import io
import logging
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import pooch
import torch

from . import files

log = logging.getLogger("lmcore")

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
# Part of the cache key: change it whenever the tokenisation below changes.
TOKENIZER_VERSION = "words-eos-train-vocab/1"

PTB_URL = "https://raw.githubusercontent.com/Lasagne/Recipes/d616658de38e69f5036b236b6acbaf6e465ec9bd/examples/penntree/ptb.{split}.txt"
WIKITEXT2_URL = (
    "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8"
    "/word_language_model/data/wikitext-2/{split}.txt"
)


class DataError(Exception):
    """The data cannot be had: missing, corrupt, not downloadable, or not a known dataset."""


@dataclass(frozen=True)
class SplitFile:
    filename: str  # the plain-text name; `filename + ".gz"` is accepted too
    sha256: str | None = None  # of the uncompressed text; None: not checked (your own corpus)
    url: str | None = None  # where to download the plain text; None: never downloaded
    tokens: int | None = None  # expected count, `<eos>` included


@dataclass(frozen=True)
class Dataset:
    name: str
    folder: str  # its subfolder under a data root (a data dir may also be this folder itself)
    splits: dict[str, SplitFile]
    vocab_size: int | None = None


DATASETS: dict[str, Dataset] = {
    "ptb": Dataset(
        "ptb",
        "ptb",
        {
            "train": SplitFile("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
                               PTB_URL.format(split="train"), 929_589),
            "valid": SplitFile("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
                               PTB_URL.format(split="valid"), 73_760),
            "test": SplitFile("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
                              PTB_URL.format(split="test"), 82_430),
        },
        vocab_size=10_000,
    ),
    "wikitext-2": Dataset(
        "wikitext-2",
        "wikitext-2",
        {
            "train": SplitFile("train.txt", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                               WIKITEXT2_URL.format(split="train"), 2_088_628),
            "valid": SplitFile("valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                               WIKITEXT2_URL.format(split="valid"), 217_646),
            "test": SplitFile("test.txt", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                              WIKITEXT2_URL.format(split="test"), 245_569),
        },
        vocab_size=33_278,
    ),
    # Your own corpus: train.txt, valid.txt, test.txt (plain or .gz) in data_dir; never downloaded.
    "text": Dataset("text", "text", {split: SplitFile(f"{split}.txt") for split in SPLITS}),
}


class Vocab:
    """Words <-> ids. Saved in checkpoints as `to_list()` and rebuilt with `Vocab(itos)`."""

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} words)"

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    def encode(self, words: list[str]) -> list[int]:
        """Ids of `words`; a word not in the vocabulary becomes `<unk>` (KeyError if there is none)."""
        unk_id = self.stoi.get(UNK)
        if unk_id is None:
            return [self.stoi[word] for word in words]
        return [self.stoi.get(word, unk_id) for word in words]

    def decode(self, ids) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def to_list(self) -> list[str]:
        return list(self.itos)


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # 1-D torch.long token ids
    valid: torch.Tensor
    test: torch.Tensor
    vocab: Vocab


def cache_dir() -> Path:
    """Where downloads and tokenised corpora go: $LMCORE_CACHE_DIR, else the per-user cache."""
    return Path(os.environ.get("LMCORE_CACHE_DIR") or pooch.os_cache("lmcore"))


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _offline() -> bool:
    return os.environ.get("LMCORE_OFFLINE", "") not in ("", "0")


def _search_dirs(dataset: Dataset, data_dir) -> list[Path]:
    # data_dir, then $LMCORE_DATA_DIR, then the cache, all of them in this order; each as a root holding
    # `ptb/`, `wikitext-2/` ... or as the dataset's own folder.
    roots = [Path(d) for d in (data_dir, os.environ.get("LMCORE_DATA_DIR")) if d]
    if dataset.splits["train"].url is not None:  # only downloadable datasets live in the cache
        roots.append(cache_dir())
    return [folder for root in roots for folder in (root / dataset.folder, root)]


def _find(split: SplitFile, dirs: list[Path]) -> Path | None:
    for folder in dirs:
        for path in (folder / split.filename, folder / (split.filename + ".gz")):
            if path.is_file():
                return path
            if path.is_symlink() or path.exists():  # there, but not text to read: a FIFO, a device, a folder
                raise DataError(f"{path}: not a regular file ({_kind(path)}); a corpus split must be a plain or .gz "
                                "text file")
    return None


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, for a message."""
    if not path.exists():
        return "a link to nothing"
    mode = path.stat().st_mode
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"a link to {kind}" if path.is_symlink() else kind


def _download(dataset: Dataset, split: SplitFile) -> Path:
    target = cache_dir() / dataset.folder
    try:
        return Path(pooch.retrieve(split.url, known_hash=f"sha256:{split.sha256}", fname=split.filename,
                                   path=target, progressbar=True))
    except (OSError, ValueError) as err:  # network errors are OSErrors; a wrong checksum is a ValueError
        raise DataError(
            f"downloading {split.url} to {target / split.filename} failed: {err}\n"
            f"expected sha256 {split.sha256}.\n"
            f"Fix: go online and retry (a partial or corrupt file is re-downloaded), or put {split.filename} "
            f"(or .gz) in a folder and pass data_dir / set LMCORE_DATA_DIR to it."
        ) from None


def find_files(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The path of each split's file, downloading the missing ones into the cache when allowed."""
    dataset = get_dataset(name)
    dirs = _search_dirs(dataset, data_dir)
    paths = {split: _find(dataset.splits[split], dirs) for split in SPLITS}
    missing = [split for split in SPLITS if paths[split] is None]
    can_download = dataset.splits["train"].url is not None and not _offline()
    if missing and not can_download:
        names = ", ".join(dataset.splits[split].filename for split in missing)
        looked = "\n  ".join(str(d) for d in dirs) or "(nowhere: no data_dir given and LMCORE_DATA_DIR is unset)"
        where = (f"put them in one of the folders above, or pass data_dir (data.dir) or set LMCORE_DATA_DIR to a "
                 f"folder holding {dataset.folder}/ or the files themselves (both are searched, in that order)")
        if dataset.splits["train"].url is None:
            fix = where.replace("them", "your train.txt, valid.txt, test.txt", 1)
        else:
            fix = f"{where}; or unset LMCORE_OFFLINE to download them into {cache_dir()}"
        expected = "".join(f"\n  {dataset.splits[s].filename}: sha256 {dataset.splits[s].sha256}"
                           for s in missing if dataset.splits[s].sha256)
        raise DataError(f"{name}: cannot find {names} (plain or .gz); looked in:\n  {looked}"
                        + (f"\nexpected:{expected}" if expected else "") + f"\nFix: {fix}.")
    for split in missing:
        paths[split] = _download(dataset, dataset.splits[split])
    return paths


def read_verified(path: Path, sha256: str | None) -> tuple[bytes, str]:
    """The uncompressed bytes of `path` and their sha256, which must be `sha256` when given (the whole file in
    memory: for the small files of tools; load_corpus reads a split as a stream)."""
    digest = verified_digest(path, sha256)
    with _open_binary(path) as f:
        return f.read(), digest


def verified_digest(path: Path, sha256: str | None) -> str:
    """The sha256 of the uncompressed text of `path`, read as a stream; it must be `sha256` when given."""
    digest = hashlib.sha256()
    try:
        with _open_binary(path) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):  # BadGzipFile is an OSError; a truncated file is an EOFError
        if path.suffix != ".gz":
            raise
        raise DataError(f"{path}: checksum failure: not a readable gzip file (truncated or changed bytes)"
                        + _expected(sha256)) from None
    if sha256 is not None and digest.hexdigest() != sha256:
        raise DataError(f"{path}: checksum mismatch: the uncompressed text has sha256 {digest.hexdigest()}"
                        + _expected(sha256))
    return digest.hexdigest()


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _expected(sha256: str | None) -> str:
    if sha256 is None:
        return "."
    return (f", expected {sha256}.\nThe file is corrupt or a different version. Fix: delete it (lmcore then "
            f"re-downloads it into {cache_dir()}) or pass data_dir / set LMCORE_DATA_DIR to a good copy.")


def _lines(path: Path):
    # Line by line as `open(path, encoding="utf8")` reads them (universal newlines), like pytorch/examples; a stream,
    # so that a corpus larger than memory is never held whole.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8")


def _tokenize(paths: dict[str, Path]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The training vocabulary and each split's token ids; only the ids (8 bytes a word) are held in memory."""
    for split in SPLITS:
        _check_fits_in_memory(paths[split])
    stoi: dict[str, int] = {}
    tensors = {"train": _ids(paths["train"], lambda words: [stoi.setdefault(w, len(stoi)) for w in words])}
    vocab = Vocab(list(stoi))
    for split in ("valid", "test"):
        try:
            tensors[split] = _ids(paths[split], vocab.encode)
        except KeyError as err:
            raise DataError(f"{paths[split]}: word {err.args[0]!r} is not in the training vocabulary, "
                            f"and there is no {UNK} to map it to") from None
    return vocab.itos, tensors


def _ids(path: Path, encode) -> torch.Tensor:
    """The token ids of one split, `encode(words)` line by line (each line's words and `<eos>`)."""
    ids = array.array("q")
    try:
        with _lines(path) as lines:
            for line in lines:
                ids.extend(encode(line.split() + [EOS]))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} of a block); save it as UTF-8") from None
    except MemoryError:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes: its token ids do not fit in this machine's "
                        "memory; use a smaller corpus or a machine with more memory") from None
    return torch.frombuffer(ids, dtype=torch.long) if len(ids) else torch.empty(0, dtype=torch.long)


def _check_fits_in_memory(path: Path) -> None:
    """Refuse, before reading it, a plain text larger than the memory available: its token ids alone (8 bytes a
    word, a word and a space being 2 bytes or more) may need more, and Linux ends such a process unannounced."""
    size, available = path.stat().st_size, available_memory()
    if path.suffix != ".gz" and available is not None and size > available:
        raise DataError(f"{path}: {size:,} bytes is more than the {available:,} bytes of memory available; its "
                        "token ids would not fit. Use a smaller corpus or a machine with more memory")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def corpus_cache_path(name: str, digests: dict[str, str]) -> Path:
    key = hashlib.sha256(" ".join([TOKENIZER_VERSION] + [digests[s] for s in SPLITS]).encode()).hexdigest()
    return cache_dir() / "corpora" / f"{name}-{key[:20]}.pt"


def load_corpus(name: str, data_dir: str | os.PathLike | None = None) -> Corpus:
    """The tokenised corpus `name` ("ptb", "wikitext-2" or "text"), from the cache when it is there."""
    dataset = get_dataset(name)
    paths = find_files(name, data_dir)
    digests = {split: verified_digest(paths[split], dataset.splits[split].sha256) for split in SPLITS}

    cached = corpus_cache_path(name, digests)
    saved = _read_cache(cached)
    if saved is None:
        itos, tensors = _tokenize(paths)
        saved = {"itos": itos, **tensors}
        files.write_atomically(cached, lambda f: torch.save(saved, f))
    return Corpus(name, saved["train"], saved["valid"], saved["test"], Vocab(saved["itos"]))


def _read_cache(path: Path) -> dict | None:
    """A cached tokenised corpus, or None when there is none; a bad entry (truncated, corrupt) is removed
    with a warning, to be rebuilt."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if not (isinstance(saved.get("itos"), list)
                and all(isinstance(saved.get(s), torch.Tensor) and saved[s].dim() == 1 for s in SPLITS)):
            raise ValueError("unexpected contents")
        return saved
    except Exception:  # torch raises RuntimeError, EOFError, UnpicklingError ... for a damaged file
        log.warning("%s: the cached tokenised corpus is unreadable; removed, rebuilding it", path)
        path.unlink(missing_ok=True)
        return None
