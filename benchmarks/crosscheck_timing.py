"""A second opinion on `spectral-peft bench`'s Llama-style ratios, written apart from it.

Only public APIs (transformers, stock PEFT, the package's configs and ``prepare_s2ft``), nothing of
``spectral_peft.tools.bench``. Differences from the project's benchmark, on purpose:

- every method gets its own full copy of the model (the benchmark shares the frozen weights between methods);
- the order of the methods is shuffled in every round (the benchmark interleaves them in a fixed order);
- one round times a training step and an unmerged inference pass (``torch.inference_mode``) of every method;
- the inputs are new random tokens in every round.

Usage: ``python benchmarks/crosscheck_timing.py --rounds 10 [--hidden 1024]`` (about 10 minutes on a 2-core CPU at
the default width 2048).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from spectral_peft import FastFourierFTConfig, LocaConfig, S2FTConfig, prepare_s2ft

INTERMEDIATE = {2048: 5632, 1024: 2816}  # the MLP's width for each model width, as in `spectral-peft bench`
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(generator: torch.Generator, batch: int, length: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def adapted(name: str, base: LlamaForCausalLM, warm_up: dict, n: int):
    model = copy.deepcopy(base)
    if name == "lora":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=PROJECTIONS))
    if name == "loca":
        return get_peft_model(model, LocaConfig(n_frequency=n, target_modules=PROJECTIONS))
    if name == "fourierft-mode":
        return get_peft_model(model, FastFourierFTConfig(n_frequency=n, target_modules=PROJECTIONS))
    if name == "s2ft":
        return prepare_s2ft(model, S2FTConfig(n_frequency=n, target_modules=PROJECTIONS, prior="gradient",
                                              prior_batches=1), [warm_up])
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hidden", type=int, choices=sorted(INTERMEDIATE), default=2048,
                        help="the model's width: 2048 (TinyLlama's) or 1024 (the narrower Llama-style shape)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=INTERMEDIATE[args.hidden], num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=1000, max_position_embeddings=512)
    base = LlamaForCausalLM(config).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    names = ["lora", "loca", "s2ft", "fourierft-mode"]
    models = {name: adapted(name, base, tokens(generator, 4, 256, 1000), args.n) for name in names}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for name, m in models.items()}
    steps, inference = {name: [] for name in names}, {name: [] for name in names}
    order = random.Random(args.seed)
    for round_ in range(args.warmup + args.rounds):
        batch = tokens(generator, 4, 256, 1000)
        for name in order.sample(names, len(names)):
            model = models[name].train()
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            step = time.perf_counter() - start
            model.eval()
            start = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            infer = time.perf_counter() - start
            if round_ >= args.warmup:
                steps[name].append(step)
                inference[name].append(infer)
        print(f"round {round_ + 1}/{args.warmup + args.rounds}", flush=True)
    lora_step, lora_infer = statistics.median(steps["lora"]), statistics.median(inference["lora"])
    print("| method | step ms (min..max) | / LoRA | unmerged inference ms (min..max) | / LoRA |")
    print("|---|---|---|---|---|")
    for name in names:
        s, i = steps[name], inference[name]
        print(f"| {name} | {statistics.median(s) * 1e3:.0f} ({min(s) * 1e3:.0f}..{max(s) * 1e3:.0f}) | "
              f"{statistics.median(s) / lora_step:.3f} | {statistics.median(i) * 1e3:.0f} "
              f"({min(i) * 1e3:.0f}..{max(i) * 1e3:.0f}) | {statistics.median(i) / lora_infer:.3f} |")


if __name__ == "__main__":
    main()
