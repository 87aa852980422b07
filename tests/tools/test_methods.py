"""The method registry: every command reads its methods from it, and each method builds and groups its
parameters as the registry says."""

from __future__ import annotations

import pytest

from spectral_peft.tools.methods import (
    METHOD_NAMES,
    METHODS,
    N_FREQUENCY,
    NO_BUDGET,
    RANK,
    REFERENCE,
    bench_variants,
    parameter_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_registry_holds_every_method_once_with_its_budget_and_defaults():
    assert METHOD_NAMES == ("loca", "s2ft", "fourierft", "fastfourierft", "lora", "full", "loca-frozen",
                            "s2ft-unordered", "s2ft-random", "dct-prior")
    ablations = {name: method.variant_of for name, method in METHODS.items() if method.variant_of}
    assert ablations == {"loca-frozen": "loca", "s2ft-unordered": "s2ft", "s2ft-random": "s2ft", "dct-prior": "s2ft"}
    for name, parent in ablations.items():
        assert METHODS[name].lr == METHODS[parent].lr and METHODS[name].own_settings == METHODS[parent].own_settings
    budgets = {name: method.budget for name, method in METHODS.items() if not method.variant_of}
    assert budgets == {"loca": N_FREQUENCY, "s2ft": N_FREQUENCY, "fourierft": N_FREQUENCY,
                       "fastfourierft": N_FREQUENCY, "lora": RANK, "full": NO_BUDGET}
    assert {name: method.lr for name, method in METHODS.items() if not method.variant_of} == {
        "loca": 1e-2, "s2ft": 1e-2, "fourierft": 5e-2, "fastfourierft": 5e-2, "lora": 1e-3, "full": 5e-5}
    assert METHODS["fourierft"].scaling == METHODS["fastfourierft"].scaling == 150.0
    assert METHODS["lora"].scaling is None and METHODS["loca"].scaling == 1.0
    # a method's own settings belong to it (and its ablations) alone
    owners = [key for method in METHODS.values() if not method.variant_of for key in method.own_settings]
    assert len(owners) == len(set(owners))


def test_bench_times_every_method_but_full_fine_tuning_the_reference_first():
    variants = bench_variants()
    assert list(variants)[0] == REFERENCE == "lora"
    assert set(variants) == {"lora", "loca", "loca-locations", "s2ft", "fourierft", "fastfourierft"}
    assert variants["fastfourierft"] == "FourierFT mode (ours)" and variants["lora"] == "LoRA (stock PEFT)"


def test_the_command_lines_copy_of_the_registry_equals_it():
    """The front end keeps the names and defaults it shows as plain data (it cannot import the registry light)."""
    from spectral_peft_cli import registry

    assert registry.METHOD_NAMES == METHOD_NAMES
    assert registry.METHOD_LRS == {name: method.lr for name, method in METHODS.items()}
    assert registry.VARIANT_OF == {name: method.variant_of for name, method in METHODS.items() if method.variant_of}
    assert registry.BENCH_VARIANTS == tuple(bench_variants())


def test_the_commands_read_the_registry(capsys):
    from spectral_peft.tools.workloads import VARIANTS
    from spectral_peft_cli import arguments, build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    # argparse may wrap a line after a hyphen (loca-frozen)
    help_text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert "one of " + ", ".join(METHOD_NAMES) in help_text
    assert ", ".join(f"{method.name} {method.lr:g}" for method in METHODS.values()) in help_text
    assert parser.parse_args(["bench"]).methods == list(bench_variants()) and VARIANTS == tuple(bench_variants())
    assert set(arguments.COMPARE_DEFAULT_METHODS) <= set(METHOD_NAMES)


@pytest.mark.parametrize("name", ["loca", "s2ft", "fourierft", "fastfourierft", "lora", "full"])
def test_each_method_builds_on_a_tiny_bert_and_groups_its_parameters(name, tiny_bert, batch_factory):
    import torch

    method = METHODS[name]
    settings = {"method": name, "n_frequency": 16, "rank": 2, "scaling": method.scaling, "seed": 0,
                "lr": method.lr, "head_lr": 5e-3, "location_lr": 0.1, "weight_decay": 0.01,
                "s2ft_prior": "gradient", "prior_batches": 1}
    peft_fields = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}
    batch = {"input_ids": batch_factory(), "labels": torch.tensor([0, 1])}
    model = method.build(tiny_bert, settings, peft_fields, [batch] if method.uses_prior else None)
    groups, kinds = parameter_groups(model, settings, "classifier")
    expected = {"loca": ["update", "head", "locations"], "full": ["update", "head"]}.get(name, ["update", "head"])
    assert kinds == expected
    lrs = dict(zip(kinds, (group["lr"] for group in groups)))
    assert lrs["update"] == method.lr and lrs["head"] == 5e-3
    if name == "loca":
        assert lrs["locations"] == 0.1 and groups[2]["weight_decay"] == 0.0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in groups for p in group["params"]}
    assert (method.schedule is not None) == (name == "loca")


@pytest.mark.parametrize("name, config_fields", [
    ("loca-frozen", {"location_learning_steps": 0}),
    ("s2ft-unordered", {"ordering": "none", "prior": "lora"}),
    ("s2ft-random", {"ordering": "random", "prior": "lora"}),
    ("dct-prior", {"ordering": "none", "prior": "gradient"}),
])
def test_an_ablation_fixes_its_settings_whatever_the_options_say(name, config_fields, tiny_bert, batch_factory):
    import argparse

    import torch

    from spectral_peft.tools.settings import resolve_settings
    from spectral_peft.tools.tasks import CLASSIFICATION, Task

    args = argparse.Namespace(
        method=name, model=None, n_frequency=16, rank=8, scaling=None, lr=None, head_lr=5e-3, location_lr=0.1,
        loca_coefficient_steps=2, loca_location_steps=2, location_learning_steps=30, s2ft_prior="lora",
        prior_batches=1, s2ft_prior_optimizer=None, s2ft_transform="dct", steps=40, epochs=None, batch_size=2,
        grad_accum=1, max_length=8, seed=0, target_modules=None, warmup_ratio=0.1, weight_decay=0.0,
        val_fraction=0.1, test_fraction=0.2)
    settings = resolve_settings(args, Task(name="t", kind=CLASSIFICATION, label_names=["a", "b"]), 8)
    parent = METHODS[name].variant_of
    assert settings["lr"] == METHODS[parent].lr
    peft_fields = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}
    batch = {"input_ids": batch_factory(), "labels": torch.tensor([0, 1])}
    model = METHODS[name].build(tiny_bert, settings, peft_fields, [batch] if METHODS[name].uses_prior else None)
    config = model.peft_config["default"]
    assert {key: getattr(config, key) for key in config_fields} == config_fields
