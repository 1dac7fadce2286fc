"""pipeline.training.ema with the EMA config's decay schedule: constant, or ramped up (warmup)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, from_dict
from pipeline.training.dit_config import EMAConfig
from pipeline.training.ema import EMA


def test_decay_schedule():
    constant = EMAConfig(decay=0.999)
    assert [constant.decay_at(s) for s in (0, 1, 5000)] == [0.0, 0.999, 0.999]
    ramp = EMAConfig(decay=0.999, warmup_power=0.75, start_step=10)
    assert ramp.decay_at(10) == 0.0  # up to start_step the EMA copies the weights
    assert ramp.decay_at(11) == pytest.approx(1 - 2**-0.75)
    assert ramp.decay_at(1010) == pytest.approx(1 - 1001**-0.75)
    assert ramp.decay_at(10**7) == 0.999  # capped by decay
    values = [ramp.decay_at(s) for s in range(11, 5000)]
    assert values == sorted(values)


def averaged(cfg: EMAConfig, steps: int) -> float:
    """The EMA of a one-weight model that is 0 at initialisation and 1 after every optimizer step:
    the result is 1 − the share of the initial weights left in the average."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, cfg.decay)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(1, steps + 1):
        ema.update(model.named_parameters(), cfg.decay_at(step))
    return ema.module.weight.item()


def test_warmup_forgets_the_initial_weights_in_a_short_run():
    """The demo's 2000 steps at decay 0.999 left 0.999^2000 = 13.5% of the untrained weights in the
    export; the warmup schedule keeps a fixed fraction of the run instead."""
    assert averaged(EMAConfig(decay=0.999), 2000) == pytest.approx(1 - 0.999**2000, abs=1e-4)
    assert averaged(EMAConfig(decay=0.999, warmup_power=2 / 3), 2000) > 1 - 1e-6


def test_bad_warmup_power_names_the_key():
    with pytest.raises(ConfigError, match="warmup_power"):
        from_dict(EMAConfig, {"warmup_power": 2})
