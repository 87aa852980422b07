"""The metrics of a split."""

from __future__ import annotations

import pytest

from spectral_peft.tools.evaluation import macro_f1


def test_macro_f1_matches_the_definition():
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 0 fp 0 fn 1 -> 0
    assert macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)
    scipy_free = macro_f1([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1])
    # class 0: 1.0; class 1: tp1 fp1 fn1 -> 0.5; class 2: tp2 fp1 fn1 -> 2/3
    assert scipy_free == pytest.approx((1 + 0.5 + 2 / 3) / 3)
