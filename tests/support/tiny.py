"""Small deterministic models and datasets shared by the tests and their worker scripts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 32
IGNORE = -100

RUN_ON_CPU = 0 < torch.cuda.device_count() < 2
"""A GPU is visible, but not one per process of a 2-process run: runs that a test compares across 1 and 2
processes all use CPU/gloo (`cpu=True`, ACCELERATE_USE_CPU for launched ones), so they differ only in what
the test is about. Without CUDA nothing is asked (the Engine must form the gloo group by itself); with 2 or
more GPUs they all run on CUDA/NCCL."""


class TinyTokenModel(nn.Module):
    """Embedding -> tanh MLP -> logits, per token: small, deterministic, and enough for gradient checks."""

    def __init__(self, width: int = 16, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(VOCAB, width)
        self.hidden = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(torch.tanh(self.hidden(self.embed(input_ids))))))


def make_model(seed: int = 0, dtype=torch.float32, width: int = 16, dropout: float = 0.0) -> TinyTokenModel:
    torch.manual_seed(seed)
    return TinyTokenModel(width, dropout).to(dtype)


class Stacked(torch.nn.Module):
    """An embedding, a stack of 3 identical blocks, a head: what regional compilation and FP8 are for (with
    width a multiple of 16, FP8 converts the Linear layers between the first and the last)."""

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU())
            for _ in range(3))
        self.head = torch.nn.Linear(width, VOCAB)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class VarLenTokens(torch.utils.data.Dataset):
    """Sequences of 2..12 tokens; about a quarter of label positions are ignored (IGNORE)."""

    def __init__(self, n: int, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(2, 13, (1,), generator=g))
            ids = torch.randint(0, VOCAB, (length,), generator=g)
            labels = torch.randint(0, VOCAB, (length,), generator=g)
            labels[torch.rand(length, generator=g) < 0.25] = IGNORE
            labels[0] = int(torch.randint(0, VOCAB, (1,), generator=g))  # at least one counted token
            self.items.append((ids, labels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class LazyTokens(torch.utils.data.Dataset):
    """VarLenTokens' kind of sample made from its index when asked: any length at no memory (a dataset beyond
    acctrain.permutation.EAGER_MAX, whose order is the Feistel one)."""

    def __init__(self, n: int, seed: int = 123):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        length = int(torch.randint(2, 13, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = torch.randint(0, VOCAB, (length,), generator=g)
        labels[1:][torch.rand(length - 1, generator=g) < 0.25] = IGNORE  # the first label always counts
        return ids, labels


class StreamOf(torch.utils.data.IterableDataset):
    """A stream of `items`, in order, pass after pass; records the epochs `set_epoch` announced."""

    def __init__(self, items):
        self.items, self.epochs = items, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return (self.items[i] for i in range(len(self.items)))


def collate(items):
    """Right-pad to the longest sequence; padding is ignored in the loss."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, (i, lab) in enumerate(items):
        ids[row, : len(i)] = i
        labels[row, : len(lab)] = lab
    return {"input_ids": ids, "labels": labels}


def token_loss(model, batch):
    """(summed token cross-entropy, number of counted tokens): the token-weighted form."""
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (batch["labels"] != IGNORE).sum()


def reference_sgd(model, dataset, plan, lr: float, max_grad_norm: float = 0.0):
    """Full-batch SGD in float64 over the plan's windows: the ground truth the Engine must match.

    Returns the final parameters and the pre-clip gradient norm of every step; the loss of every step
    (the mean over the window's counted tokens) is left in `reference_sgd.losses`.
    """
    model = model.to(torch.float64)
    norms, reference_sgd.losses = [], []
    for step in range(plan.total_steps):
        epoch, k = divmod(step, plan.steps_per_epoch)
        batch = collate([dataset[i] for i in plan.window(epoch, k)])
        model.zero_grad()
        loss_sum, count = token_loss_f64(model, batch)
        (loss_sum / count).backward()
        reference_sgd.losses.append(float(loss_sum.detach() / count))
        grads = [p.grad for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        norms.append(float(norm))
        coef = min(1.0, max_grad_norm / (float(norm) + 1e-6)) if max_grad_norm else 1.0
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * coef * p.grad
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def token_loss_f64(model, batch):
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (batch["labels"] != IGNORE).sum()


def rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all parameters together."""
    num = sum(float(torch.sum((a[k].detach().double() - b[k].detach().double()) ** 2)) for k in b)
    den = sum(float(torch.sum(b[k].detach().double() ** 2)) for k in b)
    return (num / den) ** 0.5


class TokenBlocks(torch.utils.data.Dataset):
    """Sequences counting upwards from a random start (a pattern a tiny GPT-2 learns), as Hugging Face rows:
    `input_ids` and `labels` (the model shifts them itself)."""

    def __init__(self, n: int, length: int = 12, vocab: int = 64):
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
