"""What the log calls `train/lr`: the lr of the group with multiplier 1, also after fine_tune changes the multipliers
in place (the groups keep their names)."""

from acctrain.optim import LrReadout


def groups(body_mult: float) -> list[dict]:
    return [{"name": "body", "lr_mult": body_mult, "lr": 1e-3 * body_mult, "betas": (0.9, 0.99)},
            {"name": "body/no_decay", "lr_mult": body_mult, "lr": 1e-3 * body_mult, "betas": (0.9, 0.99)},
            {"name": "head", "lr_mult": 1.0, "lr": 1e-3, "betas": (0.8, 0.99)}]


def test_train_lr_is_the_multiplier_one_groups_after_the_multipliers_change():
    readout = LrReadout()
    assert readout(groups(1.0)) == {"train/lr": 1e-3, "train/momentum": 0.9, "train/lr/body": 1e-3,
                                    "train/momentum/body": 0.9, "train/lr/head": 1e-3, "train/momentum/head": 0.8}
    after = readout(groups(0.01))  # fine_tune's second phase: the body at 1/100 of the head, same names
    assert after["train/lr"] == 1e-3 and after["train/momentum"] == 0.8  # the head's: multiplier 1
    assert after["train/lr/body"] == 1e-5
