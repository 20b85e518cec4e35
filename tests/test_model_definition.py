"""What a model file may declare (derive/model.py): parameter ranges."""

from __future__ import annotations

import math

import pytest

from derive.model import Param
from derive.models import get_model


# ---------------------------------------------------------------------------
# Param(maximum=...)


def test_maximum_is_checked_like_minimum():
    frac = Param("frac", 0.5, "fraction of the units that learn", maximum=1.0)
    assert frac.check(0.0) == 0.0 and frac.check(1.0) == 1.0
    with pytest.raises(ValueError) as err:
        frac.check(1.5)
    # the parameter, the allowed range and its meaning, in one message
    assert str(err.value) == "parameter frac must be in [0, 1] (fraction of the units that learn), got 1.5"
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        frac.check(-0.1)


def test_maximum_without_minimum_and_infinity():
    cap = Param("cap", 0.0, "a capped shift", minimum=None, maximum=2.0)
    assert cap.check(-100.0) == -100.0
    with pytest.raises(ValueError, match=r"parameter cap must be <= 2 \(a capped shift\), got 3"):
        cap.check(3.0)
    n_max = Param("n_max", 1.0, "support samples", minimum=1.0, maximum=10.0, allow_inf=True)
    with pytest.raises(ValueError, match=r"must be in \[1, 10\]"):
        n_max.check(math.inf)


def test_minimum_message_is_unchanged():
    with pytest.raises(ValueError, match=r"parameter eta must be >= 0 \(.*learning rate.*\), got -1"):
        get_model("scm").param("eta").check(-1.0)


def test_empty_range_is_refused():
    with pytest.raises(ValueError, match="parameter bad: minimum 2 is above maximum 1"):
        Param("bad", 1.0, "nothing fits", minimum=2.0, maximum=1.0)
