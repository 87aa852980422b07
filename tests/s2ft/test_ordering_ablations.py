"""S2FTConfig.ordering, the ablations of S2FT's reordering: the identity and a seeded random permutation."""

from __future__ import annotations

import pytest
import torch

from spectral_peft import S2FTConfig, prepare_s2ft
from spectral_peft.analysis import permute, top_power_cells, transform_2d
from spectral_peft.s2ft import S2FTLinear, prior_orders

from .test_prepare import _prepare_with_spy, is_permutation, s2ft_config, s2ft_layers
from .helpers import build_bert, make_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches():
    return make_batches(4)


def _cells_are_top_cells(layer: S2FTLinear, prior: torch.Tensor, rows, cols) -> None:
    power = transform_2d(permute(prior, rows, cols), "dct").abs().pow(2)
    cells = layer.s2ft_locations["default"]
    expected = top_power_cells(power, cells.shape[1], "dct")
    flat = lambda c: set((c[0] * prior.shape[1] + c[1]).tolist())  # noqa: E731
    assert flat(cells) == flat(expected)


def test_no_reordering_keeps_the_identity_and_takes_the_priors_own_top_cells(batches):
    prepared = _prepare_with_spy("gradient", batches, ordering="none")
    for name, layer in s2ft_layers(prepared["model"]).items():
        rows, cols = layer.s2ft_row_order["default"], layer.s2ft_col_order["default"]
        assert torch.equal(rows, torch.arange(32)) and torch.equal(cols, torch.arange(32))
        # the top-n DCT cells of the prior itself: what "coefficients placed once from a cheap prior" means
        _cells_are_top_cells(layer, prepared["priors"][name], rows, cols)


def test_random_reordering_is_a_seeded_permutation_per_module(batches):
    prepared = _prepare_with_spy("gradient", batches, ordering="random", ordering_seed=3)
    seen = []
    for name, layer in s2ft_layers(prepared["model"]).items():
        rows, cols = layer.s2ft_row_order["default"], layer.s2ft_col_order["default"]
        assert is_permutation(rows, 32) and is_permutation(cols, 32)
        assert not torch.equal(rows, torch.arange(32))
        config = prepared["config"]
        again_rows, again_cols = prior_orders(prepared["priors"][name], config, name)
        assert torch.equal(rows, again_rows) and torch.equal(cols, again_cols)  # reproducible from the seed
        _cells_are_top_cells(layer, prepared["priors"][name], rows, cols)
        seen.append(rows)
    assert not torch.equal(seen[0], seen[1])  # a different draw per module
    other = prior_orders(prepared["priors"][name], s2ft_config(ordering="random", ordering_seed=4), name)
    assert not torch.equal(other[0], rows)


def test_random_orders_do_not_depend_on_the_prior():
    config = s2ft_config(ordering="random")
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    assert all(torch.equal(x, y) for x, y in zip(prior_orders(a, config, "m"), prior_orders(b, config, "m")))


def test_ordered_variants_start_as_the_base_model(batches):
    for ordering in ("none", "random"):
        base = build_bert(0)
        with torch.no_grad():
            expected = base(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
        model = prepare_s2ft(base, s2ft_config(ordering=ordering), batches)
        with torch.no_grad():
            got = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
        assert torch.allclose(got, expected, atol=1e-6)


def test_saved_and_loaded_with_its_ordering(batches, tmp_path):
    from peft import PeftModel

    model = prepare_s2ft(build_bert(0), s2ft_config(ordering="random"), batches)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_bert(0), tmp_path)
    assert loaded.peft_config["default"].ordering == "random"
    for name, layer in s2ft_layers(model).items():
        other = s2ft_layers(loaded)[name]
        assert torch.equal(layer.s2ft_row_order["default"], other.s2ft_row_order["default"])


@pytest.mark.parametrize("field, value", [("ordering", "nn"), ("ordering", None), ("ordering_seed", 1.5),
                                          ("ordering_seed", True)])
def test_bad_ordering(field, value):
    with pytest.raises(ValueError, match=field):
        S2FTConfig(target_modules=["query"], **{field: value})
