"""Tokenized corpora on disk: token files cut into windows, their checks, `acctrain tokenize`, and the main job
and a 2-process run trained on them (acctrain.token_data)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
import torch

from acctrain import ConfigError
from acctrain.checkpoint import HASH
from acctrain.token_data import TokenWindows, open_tokens, tokenize
from tests.support import CPU_ARGS, ROOT, launch

TEXT = Path(inspect.__file__)
"""A text a corpus is made of: the standard library's inspect.py (over 100 KB, fixed for a Python version)."""


def write_bin(path, tokens, dtype=np.uint16):
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def test_windows_are_consecutive_runs_of_each_shard_with_next_token_labels(tmp_path):
    a = write_bin(tmp_path / "a.bin", range(0, 23))  # (23 - 1) // 5 = 4 windows, tokens 21..22 left out
    b = write_bin(tmp_path / "b.bin", range(100, 111))  # 2 windows
    data = TokenWindows([a, b], context_len=5)
    assert len(data) == 6
    assert data[0]["input_ids"].tolist() == [0, 1, 2, 3, 4] and data[0]["labels"].tolist() == [1, 2, 3, 4, 5]
    assert data[3]["input_ids"].tolist() == [15, 16, 17, 18, 19] and data[3]["labels"].tolist() == [16, 17, 18, 19, 20]
    assert data[4]["input_ids"].tolist() == [100, 101, 102, 103, 104]  # windows do not cross files
    assert data[5]["labels"].tolist() == [106, 107, 108, 109, 110]
    assert data[0]["input_ids"].dtype == torch.int64
    with pytest.raises(IndexError):
        data[6]


def test_npy_and_uint32_files(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(70_000, 70_021, dtype=np.uint32))
    data = TokenWindows(tmp_path / "t.npy", context_len=4)
    assert len(data) == 5 and data[1]["input_ids"].tolist() == [70_004, 70_005, 70_006, 70_007]
    write_bin(tmp_path / "w.bin", range(70_000, 70_009), dtype=np.uint32)
    assert TokenWindows(tmp_path / "w.bin", 4, dtype="uint32")[1]["labels"].tolist() == [70_005, 70_006, 70_007, 70_008]


def test_split_holds_out_the_last_windows(tmp_path):
    data = TokenWindows(write_bin(tmp_path / "a.bin", range(101)), context_len=10)  # 10 windows
    train, held_out = data.split(0.2)
    assert (len(train), len(held_out)) == (8, 2)
    assert held_out[0]["input_ids"][0] == 80 and train[7]["input_ids"][0] == 70
    with pytest.raises(ConfigError, match="eval_fraction"):
        data.split(0.95)  # int(10 x 0.05) = 0 windows left to train on


def test_bad_files_are_refused_naming_the_file_and_the_fix(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")  # 3 bytes: not whole uint16 tokens
    with pytest.raises(ConfigError, match=r"odd.bin: 3 bytes is not a whole number of uint16 tokens"):
        open_tokens(odd)
    with pytest.raises(ConfigError, match="no such file"):
        TokenWindows(tmp_path / "missing.bin", 4)
    np.save(tmp_path / "f.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(ConfigError, match="1-D uint16 or uint32"):
        TokenWindows(tmp_path / "f.npy", 4)
    big = TokenWindows(write_bin(tmp_path / "v.bin", [1, 2, 3, 300, 4, 5, 6, 7, 8]), 4, vocab_size=256)
    assert big[1]["input_ids"].tolist() == [4, 5, 6, 7]  # the second window is clean
    with pytest.raises(ValueError, match=r"v.bin: token id 300 .* not below the vocabulary size 256"):
        big[0]


def test_tokenize_bytes_writes_the_tokens_and_a_sidecar_read_back(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello ")
    (tmp_path / "b.txt").write_bytes("wörld\n".encode())
    meta = tokenize([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "c.bin")
    raw = b"hello " + "wörld\n".encode()
    stat = (tmp_path / "c.bin").stat()  # the digest a run records, as checkpoints hash their files
    digest = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              HASH: xxhash.xxh3_128_hexdigest(xxhash.xxh3_128_digest(np.array(list(raw), np.uint16).tobytes()))}
    assert meta == {"dtype": "uint16", "vocab_size": 256, "tokens": len(raw), "tokenizer": "bytes",
                    "sources": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], "digest": digest}
    assert np.fromfile(tmp_path / "c.bin", dtype=np.uint16).tolist() == list(raw)
    assert json.loads((tmp_path / "c.bin.json").read_text()) == meta and not (tmp_path / "c.bin.partial").exists()
    data = TokenWindows(tmp_path / "c.bin", context_len=4)
    assert data.vocab_size == 256 and data[0]["input_ids"].tolist() == list(b"hell")


@pytest.mark.processes
def test_tokenize_command_and_its_errors(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh" * 10)
    run = lambda *args: subprocess.run([sys.executable, "-m", "acctrain.cli", "tokenize", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    proc = run(str(tmp_path / "a.txt"), f"--out={tmp_path / 'a.bin'}")
    assert proc.returncode == 0, proc.stderr
    assert "80 tokens (bytes, vocabulary 256, uint16)" in proc.stdout
    assert (tmp_path / "a.bin").stat().st_size == 160
    proc = run(str(tmp_path / "nope.txt"), f"--out={tmp_path / 'b.bin'}")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = run(str(tmp_path / "a.txt"), f"--out={tmp_path / 'b.bin'}", "--tokenizer=sentencepiece:x")
    assert proc.returncode == 2 and "use bytes, tiktoken:NAME" in proc.stderr


@pytest.mark.processes
def test_main_job_trains_on_a_token_file_on_one_and_two_processes(tmp_path):
    """`data.path`: the embedded job on a tokenized corpus instead of the stdlib bytes; 1 and 2 processes take
    the same global samples per step, so their losses agree."""
    corpus = tmp_path / "corpus.bin"
    text = TEXT.read_bytes()[:40_000]
    (tmp_path / "readme.txt").write_bytes(text)
    tokenize([tmp_path / "readme.txt"], corpus)
    job = [f"data.path={corpus}", "model.context_len=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
           "global_batch_size=8", "micro_batch_size=4", "max_steps=4", "log_every=1", "eval_every=4", *CPU_ARGS]
    one = subprocess.run([sys.executable, "train.py", f"output_dir={tmp_path / 'one'}", *job], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    train, held_out = TokenWindows(corpus, 32).split(0.05)  # the job holds out the last 5 % of the windows
    assert f"dataset_len={len(train)}," in one.stdout and len(held_out) > 0
    two = launch(["train.py", f"output_dir={tmp_path / 'two'}", *job], nproc=2)
    losses = [float(line.split("eval loss ")[1].split()[0]) for p in (one, two) for line in p.stdout.splitlines()
              if line.startswith("done: ")]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.processes
def test_a_vocabulary_larger_than_the_model_is_refused_naming_the_field(tmp_path):
    corpus = write_bin(tmp_path / "big.bin", range(1000))
    (tmp_path / "big.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50257}))
    proc = subprocess.run([sys.executable, "train.py", f"output_dir={tmp_path / 'out'}", f"data.path={corpus}",
                           "model.vocab_size=256", "max_steps=1", *CPU_ARGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "model.vocab_size" in proc.stderr and "50257" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_tokenize_with_a_tokenizers_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("the cat sat the dog")
    meta = tokenize([tmp_path / "a.txt"], tmp_path / "a.bin", f"tokenizers:{tmp_path / 'tok.json'}")
    assert meta["vocab_size"] == 4 and meta["dtype"] == "uint16" and meta["tokens"] == 5
    assert np.fromfile(tmp_path / "a.bin", dtype=np.uint16).tolist() == [1, 2, 3, 1, 0]


def test_a_tokenizer_package_that_is_not_installed_is_named(tmp_path):
    try:
        import tiktoken  # noqa: F401

        pytest.skip("tiktoken is installed")
    except ImportError:
        pass
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="needs the tiktoken package: pip install tiktoken"):
        tokenize([tmp_path / "a.txt"], tmp_path / "a.bin", "tiktoken:gpt2")


@pytest.mark.processes
def test_the_main_job_on_a_token_file_resumes_on_another_world_size(tmp_path):
    """2 processes train steps 1-2 and save; 1 process continues to step 4: the uninterrupted 1-process run."""
    from safetensors.torch import load_file

    from tests.support.tiny import rel_diff

    (tmp_path / "readme.txt").write_bytes(TEXT.read_bytes()[:20_000])
    tokenize([tmp_path / "readme.txt"], tmp_path / "corpus.bin")
    job = [f"data.path={tmp_path / 'corpus.bin'}", "model.context_len=32", "model.d_model=32", "model.n_layers=1",
           "model.n_heads=2", "global_batch_size=8", "micro_batch_size=4", "scheduler=constant", *CPU_ARGS]
    python = lambda out, steps: subprocess.run([sys.executable, "train.py", f"output_dir={out}", f"max_steps={steps}",  # noqa: E731
                                                *job], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert python(tmp_path / "ref", 4).returncode == 0
    launch(["train.py", f"output_dir={tmp_path / 'run'}", "max_steps=2", *job], nproc=2)
    resumed = python(tmp_path / "run", 4)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    weights = [load_file(tmp_path / d / "checkpoints" / "step-00000004" / "model.safetensors") for d in ("ref", "run")]
    assert rel_diff(weights[1], weights[0]) < 1e-5
