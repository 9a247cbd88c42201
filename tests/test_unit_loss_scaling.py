"""acctrain.loss_scaling on its own, in float64, without processes or an Engine.

What `normalise` makes of each form a loss function may return, the contract's refusals, `model_loss`'s item
counts, and the module's promise: micro-batch losses scaled by `micro_scale`, averaged over ranks as DDP does
(summed here by hand) and, token-weighted, rescaled by `correct`, give the gradient of the whole window's loss
as autograd computes it in one piece. The gradient-accumulation bug (a mean per micro-batch) is shown to miss
that reference, so the comparisons can fail.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from acctrain.loss_scaling import LOSS_CONTRACT, correct, micro_scale, model_loss, normalise

F64 = torch.float64
RTOL = 1e-12  # float64 sums in another order


# ---- normalise ------------------------------------------------------------------------------------------------


def test_a_mean_becomes_the_sum_over_the_micro_batchs_samples():
    loss_sum, items, weighted = normalise(torch.tensor(0.75, dtype=F64), 4, F64)
    assert loss_sum.item() == 3.0 and items == 4 and weighted is False


@pytest.mark.parametrize("count", [5, 5.0, torch.tensor(5), torch.tensor([5], dtype=torch.int32)],
                         ids=["int", "float", "int64-tensor", "int32-one-element"])
def test_a_pair_keeps_its_sum_and_its_count_becomes_a_tensor_of_the_dtype(count):
    for pair in ((torch.tensor(2.5), count), [torch.tensor(2.5), count]):  # a tuple or a list
        loss_sum, items, weighted = normalise(pair, 3, F64)
        assert weighted is True and loss_sum.item() == 2.5
        assert torch.is_tensor(items) and items.dtype == F64 and items.numel() == 1 and items.item() == 5.0


def test_a_padding_micro_batch_counts_zero_and_backpropagates_zero():
    w = torch.tensor([1.5, -2.0], dtype=F64, requires_grad=True)
    for out in (w.square().mean(), (w.square().sum(), 7)):
        loss_sum, items, _ = normalise(out, 0, F64)
        assert loss_sum.item() == 0.0 and float(items) == 0.0
        assert loss_sum.requires_grad  # it still joins the backward (and DDP's all-reduce)
        (grad,) = torch.autograd.grad(loss_sum, w)
        assert torch.equal(grad, torch.zeros(2, dtype=F64))


LOSS = torch.tensor(1.0)
WRONG = {  # what the loss function returned -> what the error says it returned
    "three values": ((LOSS, 2, 3), "a tuple of 3 values"),
    "one value in a list": ([LOSS], "a list of 1 values"),
    "a dict": ({"loss": LOSS}, "a dict or model output (return its loss)"),
    "a float": (1.5, "float"),
    "a vector": (torch.ones(2), "a torch.float32 tensor of shape (2,); the loss must be one float value"),
    "an int tensor": (torch.tensor(3), "a torch.int64 tensor of shape (); the loss must be one float value"),
    "loss_sum a float": ((1.5, 3), "loss_sum as float"),
    "loss_sum a dict": (({"loss": LOSS}, 3), "loss_sum as a dict or model output (return its loss)"),
    "count a bool": ((LOSS, True), "num_items as bool; it must be a number or a one-element tensor"),
    "count a str": ((LOSS, "3"), "num_items as str"),
    "count a vector": ((LOSS, torch.tensor([1, 2])), "num_items as Tensor"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_broken_contract_is_refused_saying_what_came_back(case):
    out, said = WRONG[case]
    with pytest.raises(TypeError) as err:
        normalise(out, 2, F64)
    assert str(err.value).startswith(f"{LOSS_CONTRACT}; it returned {said}"), str(err.value)


def test_micro_scale_is_world_over_window():
    assert micro_scale(2, 8) == 0.25 and micro_scale(1, 3) == 1 / 3 and micro_scale(4, 2) == 2.0


# ---- exactness against autograd on the whole window ----------------------------------------------------------

# 11 samples of a linear regression (per-sample losses) or of "tokens" (per-token losses with a mask), as a
# window of 2 ranks: rank 0 takes micro-batches of 4 and 2 samples, rank 1 of 3, 2 and a padding micro-batch
# (a sample it re-reads, counted as 0), the uneven split a short last window gives.
X = torch.linspace(-1, 1, 11 * 3, dtype=F64).reshape(11, 3).sin() * 3
Y = torch.linspace(0, 2, 11, dtype=F64).cos()
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1],
                     [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
RANKS = [[(0, 4, 4), (4, 6, 2)], [(6, 9, 3), (9, 11, 2), (10, 11, 0)]]  # (start, stop, counted samples)
WORLD, WINDOW = len(RANKS), 11


def model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 4, dtype=F64)


def sample_mean(m: nn.Module, lo: int, hi: int) -> torch.Tensor:
    """Per-sample loss, averaged over the micro-batch (what a plain loss_fn returns)."""
    return (m(X[lo:hi]).sum(1) - Y[lo:hi]).square().mean()


def token_sum(m: nn.Module, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token losses, counted tokens): the token-weighted form; each sample has 1-4 tokens."""
    per_token = (m(X[lo:hi]) - Y[lo:hi, None]).square()
    return per_token[MASK[lo:hi]].sum(), MASK[lo:hi].sum()


def grads(m: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in m.parameters()]


def full_batch(loss: torch.Tensor, m: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(m.parameters())))


def accumulated(loss_fn, token_weighted: bool) -> list[torch.Tensor]:
    """The step as the Engine takes it: each rank backpropagates normalise(...)[0] * micro_scale per micro-batch;
    DDP averages the ranks' gradients; token-weighted, `correct` rescales once by window / global item count."""
    per_rank, items = [], torch.zeros((), dtype=F64)
    for micro_batches in RANKS:
        m = model()
        for lo, hi, counted in micro_batches:
            loss_sum, n, weighted = normalise(loss_fn(m, lo, hi), counted, F64)
            assert weighted is token_weighted
            (loss_sum * micro_scale(WORLD, WINDOW)).backward()
            items = items + n
        per_rank.append(grads(m))
    averaged = model()
    for p, *rank_grads in zip(averaged.parameters(), *per_rank):
        p.grad = sum(rank_grads) / WORLD  # DDP's all-reduce average
    if token_weighted:
        assert items.item() == MASK.sum().item()  # the padding micro-batch counted nothing
        correct(list(averaged.parameters()), WINDOW / items)
    return grads(averaged)


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = RTOL) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-15)


def test_per_sample_means_over_micro_batches_and_ranks_give_the_full_batch_gradient():
    m = model()
    assert_close(accumulated(sample_mean, token_weighted=False), full_batch(sample_mean(m, 0, WINDOW), m))


def test_token_weighted_sums_give_the_gradient_of_the_windows_token_mean():
    m = model()
    loss_sum, count = token_sum(m, 0, WINDOW)
    assert count.item() == 26
    assert_close(accumulated(token_sum, token_weighted=True), full_batch(loss_sum / count, m))


def test_the_mean_of_micro_batch_means_misses_the_reference():
    """The 2024 gradient-accumulation bug, as a check that the reference above tells the difference."""
    m, bug = model(), model()
    for micro_batches in RANKS:
        for lo, hi, counted in micro_batches:
            if counted:
                loss_sum, count = token_sum(bug, lo, hi)
                (loss_sum / count / 4).backward()  # each micro-batch by its own token count; 4 real micro-batches
    loss_sum, count = token_sum(m, 0, WINDOW)
    want = full_batch(loss_sum / count, m)
    assert max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(grads(bug), want)) > 1e-2


def test_correct_scales_every_gradient_once_and_leaves_parameters_without_one():
    frozen, a, b = (nn.Parameter(torch.ones(2, dtype=F64)) for _ in range(3))
    a.grad, b.grad = torch.tensor([2.0, -4.0], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64)
    correct([a, frozen, b], torch.tensor(0.25, dtype=torch.float32))  # the factor takes the gradients' dtype
    assert frozen.grad is None
    assert torch.equal(a.grad, torch.tensor([0.5, -1.0], dtype=F64)) and a.grad.dtype == F64
    assert torch.equal(b.grad, torch.tensor([0.25, 0.75], dtype=F64))
    correct([frozen], torch.tensor(3.0))  # no gradient at all: nothing to do


# ---- model_loss ----------------------------------------------------------------------------------------------


def ForCausalLMLoss(logits, labels):  # noqa: N802  (named as Transformers names its causal-LM loss)
    """A causal LM's own loss: position t predicts labels[t + 1]; the mean over counted labels."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def ForTokenClassification(logits, labels):  # noqa: N802
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


class OwnLoss(nn.Module):
    """A model that computes its own loss from `labels`, as HF models do; returns a dict or an object."""

    def __init__(self, loss_function, as_dict: bool = True):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(10, 10, dtype=F64)
        self.loss_function, self.as_dict = loss_function, as_dict

    def forward(self, input_ids, labels=None):
        logits = self.embed(input_ids)
        loss = None if labels is None else self.loss_function(logits, labels)
        return {"logits": logits, "loss": loss} if self.as_dict else SimpleNamespace(logits=logits, loss=loss)


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
LABELS = torch.tensor([[5, -100, 7, 8], [-100, -100, 1, 2]])  # counted: 5 as they are, 4 after the causal shift


def test_token_labels_make_a_causal_lms_loss_token_weighted_over_the_shifted_labels():
    m = OwnLoss(ForCausalLMLoss)
    loss_sum, items = model_loss(m, {"input_ids": IDS, "labels": LABELS})
    want = F.cross_entropy(m.embed(IDS)[:, :-1].flatten(0, 1), LABELS[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")
    assert items.item() == 4
    torch.testing.assert_close(loss_sum, want, rtol=RTOL, atol=0)


def test_token_labels_of_a_model_that_does_not_shift_count_every_label():
    m = OwnLoss(ForTokenClassification, as_dict=False)  # `outputs.loss` on an object
    loss_sum, items = model_loss(m, {"input_ids": IDS, "labels": LABELS})
    want = F.cross_entropy(m.embed(IDS).flatten(0, 1), LABELS.flatten(), ignore_index=-100, reduction="sum")
    assert items.item() == 5
    torch.testing.assert_close(loss_sum, want, rtol=RTOL, atol=0)


def test_a_wrapped_causal_lm_is_seen_through_its_module():
    class Wrapper(nn.Module):  # DDP keeps the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **batch):
            return self.module(**batch)

    _, items = model_loss(Wrapper(OwnLoss(ForCausalLMLoss)), {"input_ids": IDS, "labels": LABELS})
    assert items.item() == 4


def test_sample_labels_leave_the_models_mean_as_it_is():
    class Classifier(nn.Module):
        def forward(self, x, labels=None):
            return {"loss": F.mse_loss(x.sum(1), labels.to(F64))}

    batch = {"x": torch.ones(3, 2, dtype=F64), "labels": torch.tensor([1, 2, 3])}
    out = model_loss(Classifier(), batch)
    assert torch.is_tensor(out) and out.item() == pytest.approx((1 + 0 + 1) / 3, rel=RTOL)


def test_a_model_that_returns_no_loss_is_told_to_get_labels_or_a_loss_fn():
    with pytest.raises(ValueError, match=re.escape("give the batch a 'labels' entry (HF models) or pass loss_fn=")):
        model_loss(OwnLoss(ForCausalLMLoss), {"input_ids": IDS})
    with pytest.raises(ValueError, match="returned no loss"):
        model_loss(nn.Identity(), torch.ones(2))  # a tensor batch: model(batch), no `.loss`
