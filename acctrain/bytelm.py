"""The embedded default job: a small byte-level transformer language model on the Python stdlib sources.

Nothing is downloaded: the text is the running interpreter's own standard library (`*.py` files in
sorted order, so the data is deterministic for a given Python), read as raw bytes. The held-out
evaluation set is the tail of that byte stream, i.e. files the model never trains on.

    model = ByteLM(ModelConfig())
    train_set, eval_set = stdlib_datasets(DataConfig(), context_len=128)
    loss_sum, num_tokens = lm_loss(model, batch)
"""

from __future__ import annotations

import math
import sysconfig
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from acctrain.config import _coerce_types
from acctrain.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    """Shape of the byte-level transformer."""

    context_len: int = 128
    """Bytes of context per training sample."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    dropout: float = 0.0
    """Dropout probability on attention and MLP outputs."""
    vocab_size: int | None = None
    """Token vocabulary of the embedding and output layer; None: the data's (256 for bytes, a token file's from its sidecar)."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        for name in ("context_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}.")
        if self.d_model % self.n_heads:
            raise ConfigError("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}.")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError("vocab_size", f"must be >= 1, got {self.vocab_size}.")


@dataclass
class DataConfig:
    """Which bytes of the standard library to train and evaluate on."""

    max_bytes: int = 3_000_000
    """Bytes of stdlib source to read, in sorted file order (the first ones)."""
    eval_fraction: float = 0.05
    """Fraction of the data, at its end, held out for evaluation (of the bytes, or of a token file's windows)."""
    path: str | None = None
    """Token files to train on instead of the stdlib bytes: .bin (nanoGPT's layout) or .npy, comma-separated shards (`acctrain tokenize` writes them)."""
    dtype: str | None = None
    """Token width of a .bin without a sidecar .json: uint16 (nanoGPT's, the default) or uint32."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        if self.max_bytes < 1000:
            raise ConfigError("max_bytes", f"must be >= 1000, got {self.max_bytes}.")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}.")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ByteLM(nn.Module):
    """A GPT-style decoder over bytes (vocabulary 256) or tokens (`vocab_size`), with tied input and output
    embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg  # its constructor's settings: what `acctrain export` records (acctrain_model.json)
        self.embed = nn.Embedding(cfg.vocab_size or 256, cfg.d_model)
        self.pos = nn.Embedding(cfg.context_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):  # GPT-2's residual scaling
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-byte cross-entropy and the number of predicted (non-ignored) bytes."""
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


class ByteChunks(torch.utils.data.Dataset):
    """Non-overlapping chunks of a byte stream: input bytes and the next byte of each as label."""

    def __init__(self, data: torch.Tensor, context_len: int):
        self.data, self.context_len = data, context_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.context_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = self.data[i * self.context_len : (i + 1) * self.context_len + 1].long()
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def stdlib_bytes(max_bytes: int) -> bytes:
    """The first `max_bytes` of the running interpreter's stdlib `*.py` files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        out += path.read_bytes()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def stdlib_datasets(cfg: DataConfig, context_len: int) -> tuple[ByteChunks, ByteChunks]:
    """Train and held-out eval sets: the stream's head and its tail."""
    data = torch.frombuffer(bytearray(stdlib_bytes(cfg.max_bytes)), dtype=torch.uint8)
    split = int(len(data) * (1 - cfg.eval_fraction))
    if split < context_len + 1 or len(data) - split < context_len + 1:
        raise ConfigError("data.max_bytes", f"too few bytes for context_len={context_len}; raise max_bytes.")
    return ByteChunks(data[:split], context_len), ByteChunks(data[split:], context_len)


def job_data(data: DataConfig, model: ModelConfig) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, ModelConfig]:
    """The embedded job's training and evaluation sets, and its model config with the vocabulary resolved:
    the stdlib bytes, or the token files of `data.path` (acctrain.token_data) with the last `eval_fraction`
    of their windows held out. A model vocabulary smaller than the data's is refused, naming both."""
    from acctrain.token_data import TokenWindows

    if data.path is None:
        train, held_out = stdlib_datasets(data, model.context_len)
        vocab, source = 256, "the stdlib bytes"
    else:
        windows = TokenWindows([p.strip() for p in data.path.split(",") if p.strip()], model.context_len,
                               dtype=data.dtype)
        if windows.vocab_size is None and model.vocab_size is None:
            raise ConfigError("model.vocab_size", f"{data.path} has no sidecar .json naming its vocabulary; set "
                              "model.vocab_size (token ids must be below it).")
        windows.vocab_size = windows.vocab_size or model.vocab_size  # every window is checked against it
        train, held_out = windows.split(data.eval_fraction)
        vocab, source = windows.vocab_size, data.path
    if model.vocab_size is not None and model.vocab_size < vocab:
        raise ConfigError("model.vocab_size", f"{model.vocab_size} is smaller than the vocabulary of {source} "
                          f"({vocab}); raise it to {vocab} or leave it unset (the data's).")
    return train, held_out, dataclasses.replace(model, vocab_size=model.vocab_size or vocab)
