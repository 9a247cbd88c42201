"""Hugging Face `datasets.Dataset` as training and evaluation data, as is.

    engine = Engine(model, cfg, tokenized["train"], tokenized["validation"])   # no collate_fn, no loss_fn

When the data is a `datasets.Dataset` (Arrow, map-style; `datasets` stays optional: nothing here imports it)
and no `collate_fn` is given, rows are collated by `PadCollator`: every list-valued column is right-padded to
the micro-batch's longest row (labels with -100, which the loss ignores, `attention_mask` with 0, others
with the model's `pad_token_id`, else 0) and an `attention_mask` is made for `input_ids` when the dataset
has none. When no `loss_fn` is given either, the model is called as `model(**batch)`, so the columns its
`forward` does not name (raw text, ids, lengths) are dropped first, as the HF Trainer does (a `**kwargs`
takes none: give a `loss_fn` or a `collate_fn` to keep a column). The model's own loss of a padded batch is a mean over its label
tokens; `loss_scaling.model_loss` turns it back into a sum and a token count, so each step is the exact
token-weighted mean over all its micro-batches and ranks.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

LABEL_PAD = -100
LABEL_COLUMNS = ("labels", "label", "label_ids")


def is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "column_names")


def adapt(model: torch.nn.Module, train_data: Any, eval_data: Any, collate_fn: Callable | None,
          loss_fn: Callable | None) -> tuple[Any, Any, Callable | None]:
    """The training and evaluation data ready for the Engine's loaders, and the collate function for them."""
    if not any(is_hf_dataset(d) for d in (train_data, eval_data)):
        return train_data, eval_data, collate_fn
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return (_pruned(train_data, model, loss_fn), _pruned(eval_data, model, loss_fn),
            collate_fn or PadCollator(pad if pad is not None else 0))


def _pruned(data: Any, model: torch.nn.Module, loss_fn: Callable | None) -> Any:
    if not is_hf_dataset(data) or loss_fn is not None or not data.column_names:  # a stream may not know them yet
        return data
    return data.remove_columns(unused_columns(data.column_names, model))


def unused_columns(columns: list[str], model: torch.nn.Module) -> list[str]:
    """The columns that `model(**batch)` does not name (its **kwargs take none: the HF Trainer's rule)."""
    params = inspect.signature(model.forward).parameters
    return [c for c in columns if c not in params and c not in LABEL_COLUMNS]


class PadCollator:
    """Rows (dicts) to a batch of tensors: list-valued columns right-padded to the longest row (see the module)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            if isinstance(values[0], str):
                raise TypeError(f"column {key!r} holds text; tokenize it, drop it (dataset.remove_columns), or pass "
                                "a collate_fn")
            if isinstance(values[0], (list, tuple)) or torch.is_tensor(values[0]) and values[0].dim() > 0:
                pad = LABEL_PAD if key in LABEL_COLUMNS else 0 if key == "attention_mask" else self.pad_token_id
                batch[key] = _pad([torch.as_tensor(v) for v in values], pad)
            else:
                batch[key] = torch.as_tensor(values)
        if "input_ids" in batch and "attention_mask" not in batch:
            lengths = torch.tensor([len(row["input_ids"]) for row in rows])
            batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
        return batch


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows), *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
