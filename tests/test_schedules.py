import math

import pytest

from dynbatch.errors import UserError
from dynbatch.train.schedules import scheduled_lr


def test_schedules():
    kw = dict(base_lr=0.1, epochs=10)
    assert scheduled_lr(3.3, schedule="constant", **kw) == 0.1
    assert scheduled_lr(4.9, schedule="step", **kw) == pytest.approx(0.1)
    assert scheduled_lr(5.0, schedule="step", **kw) == pytest.approx(0.01)
    assert scheduled_lr(7.5, schedule="step", **kw) == pytest.approx(0.001)
    assert scheduled_lr(2.0, schedule="step", milestones=(1, 2), gamma=0.5, **kw) == pytest.approx(0.025)
    assert scheduled_lr(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert scheduled_lr(5, schedule="cosine", **kw) == pytest.approx(0.05)
    assert scheduled_lr(10, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    # Linear warm-up: proportional to progress, never zero, then the schedule.
    w = [scheduled_lr(p, schedule="constant", warmup_epochs=2, **kw) for p in (0, 1, 2)]
    assert 0 < w[0] < 1e-3 and w[1] == pytest.approx(0.05, rel=1e-3) and w[2] == 0.1
    with pytest.raises(UserError):
        scheduled_lr(0, schedule="linear", **kw)
    assert math.isfinite(scheduled_lr(100, schedule="cosine", **kw))
