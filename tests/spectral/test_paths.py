"""The path a layer call takes: the cost model's choices."""

from __future__ import annotations

import pytest
import torch

from spectral_peft import spectral

from .reference import (
    make_spec,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_on_a_gpu_the_cost_model_picks_the_factored_path_for_wide_layers_and_the_dense_one_for_many_columns():
    gpu = torch.device("cuda")  # the choice reads the device's type only
    llama = make_spec(5632, 2048, n_coef=1000, seed=1)
    assert spectral.choose_path(1024, llama, gpu) == "factored"
    assert spectral.choose_path(1024, llama) == "activation"  # on a CPU
    # the FourierFT mode's 2 n columns at n = 10000 on a 1024-wide layer: the dense path's 1024 x 1024 is less
    many = make_spec(1024, 1024, n_coef=10000, transform="dft", seed=1)
    assert spectral.choose_path(4096, many, gpu) == "dense"
