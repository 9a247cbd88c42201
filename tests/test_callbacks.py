"""Callback events fire in the documented order, the documented number of times."""

from __future__ import annotations

import pytest

from acctrain import Callback, Engine, TrainConfig
from acctrain.callbacks import EVENTS
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss


class Every(Callback):
    pass


for _event in EVENTS:  # a callback that defines every event
    setattr(Every, _event, lambda self, engine, _e=_event: self.events.append(_e))


def test_event_order_for_one_epoch_of_two_steps(tmp_path):
    cb = Every()
    cb.events = []
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, epochs=1)
    Engine(make_model(), cfg, VarLenTokens(16), VarLenTokens(4), loss_fn=token_loss, callbacks=[cb],
           collate_fn=collate).fit()
    step = ["before_step"] + ["after_loss", "after_backward"] * 2 + ["before_optimizer_step", "after_step"]
    assert cb.events == ["before_fit", "before_epoch", *step, *step, "after_evaluate", "after_epoch", "after_fit"]


def test_unknown_event_name_is_an_error():
    class Typo(Callback):
        def after_bakward(self, engine):
            pass

    with pytest.raises(ValueError, match="after_bakward"):
        Engine(make_model(), TrainConfig(global_batch_size=4, micro_batch_size=4), VarLenTokens(4),
               loss_fn=token_loss, callbacks=[Typo()], collate_fn=collate)
