"""Parity: the Engine, a hand-written Accelerate loop and a raw PyTorch loop give identical weights.

The same model, data order (the Engine's DataPlan windows), AdamW with the same parameter groups, mean
loss over each optimizer step's window, and clipping once at the end of the window. The comparison is
torch.equal, not a tolerance, on the CPU (`cpu=True` even where a GPU is visible): with power-of-two
micro and global batches every loss scaling is exact
(the Engine backpropagates `mean x micro x (world / global)`, Accelerate and the raw loop
`mean / accumulation`, and both factors are the same power of two), the gradients accumulate in the
same order, and clipping and AdamW are the same torch functions. This is the correctness side of
benchmarks/step_overhead.py, which times these three loops against each other.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from acctrain import Callback, Engine, TrainConfig
from acctrain.data import DataPlan

DATASET_LEN = 16
GLOBAL_BATCH = 8  # 2 optimizer steps per epoch
STEPS = 6  # 3 epochs: the data order changes with the epoch
LR = 1e-2
CLIP = 0.1  # below the gradient norms here, so clipping acts (checked below)
BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.01


class Mlp(nn.Module):
    """Weights, biases and a LayerNorm: both AdamW groups (decay, no decay) are exercised."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


def make_model() -> Mlp:
    torch.manual_seed(0)
    return Mlp()


def make_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(DATASET_LEN, 8, generator=g), torch.randint(0, 4, (DATASET_LEN,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)  # a mean over the micro-batch's samples


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """The Engine's default optimizer, written out: decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, foreach=True)


def plan_batches(micro: int):
    """The Engine's data order: the DataPlan's windows, epoch by epoch, as micro-batches."""
    plan = DataPlan(DATASET_LEN, GLOBAL_BATCH, micro, world_size=1, seed=0, max_steps=STEPS)
    data = make_data()
    windows = [w for epoch in range(plan.num_epochs) for w in plan.rank_windows(epoch, 0)][:STEPS]
    return plan.accumulation, [[data[mb.indices] for mb in w.micro_batches] for w in windows]


def raw_loop(micro: int) -> dict[str, torch.Tensor]:
    accumulation, windows = plan_batches(micro)
    model = make_model()
    optimizer = adamw(model)
    for window in windows:
        for batch in window:
            (loss_fn(model, batch) / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.state_dict()


def accelerate_loop(micro: int) -> dict[str, torch.Tensor]:
    """The loop of Accelerate's documentation: accumulate, backward, clip on sync, step, zero_grad."""
    accumulation, windows = plan_batches(micro)
    _fresh_accelerate()
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    model = make_model()
    model, optimizer = accelerator.prepare(model, adamw(model))
    for batch in (b for window in windows for b in window):
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
    return accelerator.unwrap_model(model).state_dict()


class GradNorms(Callback):
    def __init__(self):
        self.norms = []

    def before_optimizer_step(self, engine):
        self.norms.append(float(engine.grad_norm))


def engine_run(micro: int, output_dir) -> tuple[dict[str, torch.Tensor], list[float]]:
    _fresh_accelerate()
    config = TrainConfig(output_dir=str(output_dir), global_batch_size=GLOBAL_BATCH, micro_batch_size=micro,
                         max_steps=STEPS, lr=LR, adam_betas=BETAS, weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
                         scheduler="constant", resume="none", cpu_threads=1, cpu=True)
    norms = GradNorms()
    engine = Engine(make_model(), config, make_data(), loss_fn=loss_fn, callbacks=[norms])
    engine.fit()
    engine.close()
    return engine.unwrapped_model.state_dict(), norms.norms


def _fresh_accelerate() -> None:
    """Each loop gets its own Accelerator (Accelerate keeps process-wide singletons)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def one_thread():
    """One torch thread for all three loops (the Engine sets it from cpu_threads), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("micro", [8, 2], ids=["accumulation-1", "accumulation-4"])
def test_engine_matches_handwritten_loops(tmp_path, one_thread, micro):
    engine_weights, norms = engine_run(micro, tmp_path / "engine")
    assert len(norms) == STEPS and min(norms) > CLIP  # clipping acted on every step
    reference = {"accelerate": accelerate_loop(micro), "raw": raw_loop(micro)}
    initial = make_model().state_dict()
    assert any(not torch.equal(engine_weights[k], initial[k]) for k in initial)  # it trained
    for name, weights in reference.items():
        assert weights.keys() == engine_weights.keys()
        different = [k for k in weights if not torch.equal(weights[k], engine_weights[k])]
        assert not different, f"{name} loop differs from the Engine in {different}"
