"""How well do S2FT priors point along the first real gradient step? (the tiny random BERT of the tests)

For each seed (model and data), the reference is the first step of real gradient descent, computed by plain
autograd on an untouched model in eval mode, in two readings: on the first batch only (-g1) and on all the
prior's batches together (-sum g, the full-batch step on the data the prior sees). Printed: the cosine of each
prior with both, for the implemented priors (`gradient_prior`, `lora_prior` with SGD, the default, and with Adam:
A on the first batch's input directions, eval mode) and for LoRA warm-up variants that were measured against them
(stock PEFT LoRA throughout; they differ in the init of A, the optimizer and train/eval mode). Every LoRA prior
is `scaling * B @ A` minus its value at init (zero for B = 0).

    python benchmarks/s2ft_prior_cosine.py [--seeds 0 1 2 3 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tiny model and batches of the tests

from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from spectral_peft import S2FTConfig  # noqa: E402
from spectral_peft.s2ft import S2FTLinear, gradient_prior, lora_prior  # noqa: E402
from tests.s2ft.helpers import build_bert, cosine, flat, make_batches, reference_gradients  # noqa: E402

TARGETS = ["query", "value"]

# name: (init_lora_weights or "inputs" for A on the first batch's input directions, optimizer, lr, train mode)
VARIANTS = {
    "stock init, Adam 1e-3, train mode (before)": (True, "adam", 1e-3, True),
    "stock init, Adam 1e-3, eval mode": (True, "adam", 1e-3, False),
    "stock init, SGD 1e-2, eval mode": (True, "sgd", 1e-2, False),
    "gaussian init, Adam 1e-3, train mode": ("gaussian", "adam", 1e-3, True),
    "orthogonal init, Adam 1e-3, train mode": ("orthogonal", "adam", 1e-3, True),
    "eva init (rho 1), Adam 1e-3, train mode": ("eva", "adam", 1e-3, True),
    "eva init (rho 1), SGD 1e-2, eval mode": ("eva", "sgd", 1e-2, False),
    "inputs init, SGD 1e-2, train mode": ("inputs", "sgd", 1e-2, True),
    "inputs init, SGD 1e-1, eval mode": ("inputs", "sgd", 1e-1, False),
    "inputs init, SGD 1, eval mode": ("inputs", "sgd", 1.0, False),
    # A's rows on the input directions scaled by their singular values s_i (s_i^2): Adam normalises B's steps entry
    # by entry, so the relative weight of the directions can only come from A
    "inputs x s init, Adam 1e-3, eval mode": ("inputs^1", "adam", 1e-3, False),
    "inputs x s^2 init, Adam 1e-3, eval mode": ("inputs^2", "adam", 1e-3, False),
}


def scaled_input_directions(peft_model, batch, rank: int, power: int) -> dict[str, torch.Tensor]:
    """The top ``rank`` right singular vectors of each LoRA layer's input on ``batch`` (as the implemented prior
    takes them), each times (its singular value / their RMS) ** power."""
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
               for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        peft_model(**batch)
    for handle in handles:
        handle.remove()
    rows = {}
    for name, x in inputs.items():
        x = x.reshape(-1, x.shape[-1]).float()
        eig = torch.linalg.eigh(x.T @ x)
        values = eig.eigenvalues.flip(-1)[:rank].clamp_min(0).sqrt()
        rows[name] = eig.eigenvectors.flip(-1)[:, :rank].T * ((values / values.pow(2).mean().sqrt()) ** power)[:, None]
    return rows


def lora_variant(model, batches, steps, rank, init, optimizer, lr, train_mode):
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=TARGETS, modules_to_save=["classifier"],
        init_lora_weights=True if str(init).startswith("inputs") else init,
        eva_config=EvaConfig(rho=1.0, use_label_mask=False) if init == "eva" else None,
    )
    peft_model = get_peft_model(model, config, adapter_name="s2ft_prior")
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    if init == "eva":
        initialize_lora_eva_weights(peft_model, batches, adapter_name="s2ft_prior", show_progress_bar=False)
    if str(init).startswith("inputs"):
        power = int(init.partition("^")[2] or 0)
        for name, rows in scaled_input_directions(peft_model, batches[0], rank, power).items():
            with torch.no_grad():
                layers[name].lora_A["s2ft_prior"].weight[: rows.shape[0]] = rows

    def delta():
        return {n: (m.scaling["s2ft_prior"] * m.lora_B["s2ft_prior"].weight @ m.lora_A["s2ft_prior"].weight).detach()
                for n, m in layers.items()}

    start = delta()  # not zero for the orthogonal init
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    peft_model.train(train_mode)
    for batch in itertools.islice(itertools.cycle(batches), steps):
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: d - start[n] for n, d in delta().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--batches", type=int, default=4, help="prior batches (of 4 examples)")
    parser.add_argument("--steps", type=int, default=4, help="LoRA warm-up steps (4 = one pass over the batches)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    config = S2FTConfig(target_modules=TARGETS, n_frequency=50, modules_to_save=["classifier"],
                        prior_batches=args.batches, prior_steps=args.steps, prior_rank=args.rank)

    def implemented_gradient(model, batches):
        wrapped = get_peft_model(model, config)
        return gradient_prior(wrapped, [m for m in wrapped.modules() if isinstance(m, S2FTLinear)], batches, args.batches)

    def variant(spec):
        return lambda model, batches: lora_variant(model, batches, args.steps, args.rank, *spec)

    adam = dataclasses.replace(config, prior_optimizer="adam")
    priors = {
        "gradient (implemented)": implemented_gradient,
        "lora, SGD 0.1 (implemented, default)": lambda model, batches: lora_prior(model, config, batches),
        "lora, Adam 1e-3 (implemented, prior_optimizer='adam')": lambda model, batches: lora_prior(model, adam, batches),
    }
    priors.update({name: variant(spec) for name, spec in VARIANTS.items()})

    references = {}
    for seed in args.seeds:
        batches = make_batches(args.batches, seed=seed)
        grads = reference_gradients(build_bert(seed), batches)
        references[seed] = (batches, -flat(grads[0]), -sum(flat(g) for g in grads))
    print(f"cosine with the first gradient step, seeds {args.seeds}, {args.batches} batches, LoRA rank {args.rank}, "
          f"{args.steps} warm-up steps: '-g1' first batch, '-sum g' all prior batches")
    for name, estimate in priors.items():
        first, full = [], []
        for seed, (batches, g1, g_all) in references.items():
            torch.manual_seed(seed)  # LoRA's random init of A (when used)
            prior = flat(estimate(build_bert(seed), batches))
            first.append(cosine(prior, g1))
            full.append(cosine(prior, g_all))
        print(f"{name:48s} -g1: {' '.join(f'{c:5.2f}' for c in first)} | -sum g: {' '.join(f'{c:5.2f}' for c in full)}"
              f" | min {min(full):.2f}", flush=True)


if __name__ == "__main__":
    main()
