"""Tokenized corpora on disk: memory-mapped files of token ids, cut into training windows.

    train = TokenWindows(["shard0.bin", "shard1.bin"], context_len=1024)   # uint16, nanoGPT's .bin layout
    train, held_out = TokenWindows("corpus.npy", 1024).split(0.05)        # .npy: dtype from its header
    acctrain tokenize data/*.txt --out corpus.bin                          # bytes; or --tokenizer tiktoken:gpt2

A file is a flat array of token ids: nanoGPT's `.bin` (raw little-endian uint16, or uint32 when its
`.json` sidecar says so) or a 1-D `.npy` of uint16/uint32. Sample i is the i-th run of `context_len + 1`
tokens of its shard, the model's input the first `context_len` and its labels the last `context_len` (the
next token of each); runs do not cross files, and a shard's last tokens that do not fill a run are left
out. Shards are concatenated in the order given: the sample count is the sum of theirs. Nothing is read
until a sample is asked for, so the corpus can be larger than memory, and every rank maps the same files.

`acctrain tokenize` writes such a `.bin` and its sidecar `{OUT}.json` (dtype, vocab_size, token count,
tokenizer, sources, and the file's digest with its size and mtime, which a run records: acctrain.data_identity): byte-level by default (vocabulary 256, no dependency), or a `tiktoken` encoding or a
`tokenizers` tokenizer file when that package is installed. The sidecar is read back by `TokenWindows`
(dtype, and the vocabulary that every window is checked against).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from acctrain import checkpoint
from acctrain.errors import ConfigError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def open_tokens(path: str | Path, dtype: str | None = None) -> tuple[np.ndarray, dict]:
    """A token file memory-mapped read-only, and its sidecar's metadata (empty without one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("data.path", f"{path}: no such file (give a tokenized .bin or .npy; `acctrain tokenize` "
                          "writes one from text).")
    meta = json.loads(sidecar(path).read_text()) if sidecar(path).is_file() else {}
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
            raise ConfigError("data.path", f"{path}: a {tokens.dtype} array of shape {tokens.shape}; a token file "
                              "is a 1-D uint16 or uint32 array.")
        return tokens, meta
    name = dtype or meta.get("dtype", "uint16")
    if name not in DTYPES:
        raise ConfigError("data.dtype", f"{name!r} is not a token width; use uint16 or uint32.")
    width = np.dtype(DTYPES[name]).itemsize
    size = path.stat().st_size
    if size % width:
        raise ConfigError("data.path", f"{path}: {size} bytes is not a whole number of {name} tokens ({width} bytes "
                          "each): a truncated file, or another token width (set data.dtype, or rewrite it with "
                          "`acctrain tokenize`).")
    return np.memmap(path, dtype=DTYPES[name], mode="r"), meta


class TokenWindows(torch.utils.data.Dataset):
    """Training windows of `context_len + 1` tokens over one or more token files (see the module docstring)."""

    def __init__(self, paths: str | Path | Sequence[str | Path], context_len: int, vocab_size: int | None = None,
                 dtype: str | None = None):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ConfigError("data.path", "no token files given.")
        self.paths, self.context_len = [Path(p) for p in paths], context_len
        opened = [open_tokens(p, dtype) for p in self.paths]
        self.shards = [tokens for tokens, _ in opened]
        vocabs = {meta["vocab_size"] for _, meta in opened if "vocab_size" in meta}
        if len(vocabs) > 1:
            raise ConfigError("data.path", f"the shards were tokenized with different vocabularies {sorted(vocabs)}.")
        self.vocab_size = vocab_size or (vocabs.pop() if vocabs else None)
        """Token ids must be below it (checked per window); None: unchecked (no sidecar, none given)."""
        counts = [max(0, (len(t) - 1) // context_len) for t in self.shards]
        self.starts = [0]
        for count in counts:
            self.starts.append(self.starts[-1] + count)
        self.range = (0, self.starts[-1])  # the windows this dataset serves (split() narrows it)

    def __len__(self) -> int:
        return self.range[1] - self.range[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        i += self.range[0]
        shard = bisect.bisect_right(self.starts, i) - 1
        start = (i - self.starts[shard]) * self.context_len
        window = torch.from_numpy(self.shards[shard][start : start + self.context_len + 1].astype(np.int64))
        if self.vocab_size is not None and int(window.max()) >= self.vocab_size:
            raise ValueError(f"{self.paths[shard]}: token id {int(window.max())} at tokens {start}.."
                             f"{start + self.context_len} is not below the vocabulary size {self.vocab_size} (a file "
                             "from another tokenizer, or a damaged one).")
        return {"input_ids": window[:-1], "labels": window[1:]}

    def split(self, held_out: float) -> tuple[TokenWindows, TokenWindows]:
        """(the first 1 - held_out of the windows, the rest): a training set and an evaluation set."""
        cut = self.range[0] + int(len(self) * (1 - held_out))
        if not self.range[0] < cut < self.range[1]:
            raise ConfigError("data.eval_fraction", f"{held_out} of {len(self)} windows leaves one side empty.")
        first, rest = (_narrowed(self, self.range[0], cut), _narrowed(self, cut, self.range[1]))
        return first, rest


def _narrowed(data: TokenWindows, start: int, stop: int) -> TokenWindows:
    view = TokenWindows.__new__(TokenWindows)
    view.__dict__.update(data.__dict__, range=(start, stop))
    return view


# ------------------------------------------------------------------------------------------- tokenize


def tokenize(inputs: Iterable[str | Path], out: str | Path, tokenizer: str = "bytes") -> dict:
    """Write the inputs' tokens, concatenated in order, to `out` (raw uint16, or uint32 for vocabularies over
    65,536) and the sidecar `{out}.json`; returns the sidecar's content.

    `tokenizer`: "bytes" (each byte a token, vocabulary 256), "tiktoken:NAME" (e.g. tiktoken:gpt2; needs
    `tiktoken`), or "tokenizers:PATH" (a tokenizer.json; needs `tokenizers`).
    """
    encode, vocab_size = _tokenizer(tokenizer)
    name = "uint16" if vocab_size <= 2**16 else "uint32"
    out, inputs = Path(out), [Path(p) for p in inputs]
    missing = [str(p) for p in inputs if not p.is_file()]
    if not inputs or missing:
        raise ConfigError("inputs", f"no such file(s): {missing}" if missing else "no input files given.")
    count, partial = 0, out.with_name(out.name + ".partial")
    with open(partial, "wb") as f:
        for path in inputs:
            with open(path, "rb") as source:
                while chunk := source.read(64 * 2**20) if tokenizer == "bytes" else source.read():
                    ids = np.asarray(encode(chunk), dtype=DTYPES[name])
                    f.write(ids.tobytes())
                    count += len(ids)
    partial.replace(out)  # the file appears whole or not at all, its sidecar after it
    meta = {"dtype": name, "vocab_size": vocab_size, "tokens": count, "tokenizer": tokenizer,
            "sources": [str(p) for p in inputs], "digest": file_record(out)}
    sidecar(out).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def file_record(path: Path) -> dict:
    """A token file's size, mtime and digest (the checkpoints' HASH), as the sidecar records it: a run's record of
    its data (acctrain.data_identity) reuses the digest while the file keeps that size and mtime."""
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, checkpoint.HASH: checkpoint.file_digests([path])[path]}


def _tokenizer(spec: str):
    """(encode: bytes -> token ids, vocabulary size) for a tokenizer spec."""
    kind, _, name = spec.partition(":")
    if spec == "bytes":
        return (lambda data: np.frombuffer(data, dtype=np.uint8)), 256
    try:
        if kind == "tiktoken" and name:
            import tiktoken

            enc = tiktoken.get_encoding(name)
            return (lambda data: enc.encode_ordinary(data.decode("utf-8", errors="replace"))), enc.n_vocab
        if kind == "tokenizers" and name:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(name)
            return (lambda data: tok.encode(data.decode("utf-8", errors="replace")).ids), tok.get_vocab_size()
    except ImportError as err:
        raise ConfigError("tokenizer", f"{spec} needs the {err.name} package: pip install {err.name}.") from None
    raise ConfigError("tokenizer", f"{spec!r}: use bytes, tiktoken:NAME (e.g. tiktoken:gpt2) or tokenizers:PATH.")
