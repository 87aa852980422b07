"""Which S2FT prior orders a real weight change better: `gradient`, `lora` (SGD, the default) or `lora` with Adam? (offline MiniLM + BBC News)

A reference weight change comes from fully fine-tuning the model for --reference-steps steps. Each prior is
estimated as prepare_s2ft does, its row/column orderings computed, and the top-1% DCT energy of the reference
change measured under them (higher is better), next to the original order, a random order and the change's own
ordering (an upper bound).

    python benchmarks/s2ft_prior.py [--reference-steps 60] [--output docs/s2ft_prior.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from spectral_peft import S2FTConfig  # noqa: E402
from spectral_peft.analysis import spectral_energy  # noqa: E402
from spectral_peft.tools.data import batches, default_model_path, load_bbc_news, tokenize_classification  # noqa: E402
from spectral_peft.s2ft import gradient_prior, lora_prior, nearest_neighbor_order  # noqa: E402
from spectral_peft.s2ft.layer import S2FTLinear  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-steps", type=int, default=60)
    parser.add_argument("--reference-lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--share", type=float, default=0.01, help="top share of coefficients whose energy is reported")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenize_classification(tokenizer, load_bbc_news(seed=0)["train"], args.max_length)
    stream = list(itertools.islice(batches(encoded, args.batch_size, seed=0), max(args.reference_steps, 50)))
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    targets = [n for n, _ in base.named_modules() if n.endswith(("attention.self.query", "attention.self.value"))]

    # reference: a real weight change from full fine-tuning
    tuned = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=args.reference_lr)
    start = time.perf_counter()
    for batch in stream[: args.reference_steps]:
        tuned(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reference_time = time.perf_counter() - start
    reference = {
        n: (tuned.get_submodule(n).weight - base.get_submodule(n).weight).detach() for n in targets
    }

    config = S2FTConfig(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    priors, prior_time = {}, {}
    start = time.perf_counter()
    from peft import get_peft_model

    wrapped = get_peft_model(copy.deepcopy(base), config)
    layers = [m for m in wrapped.modules() if isinstance(m, S2FTLinear)]
    priors["gradient"] = gradient_prior(wrapped, layers, stream, config.prior_batches)
    prior_time["gradient"] = time.perf_counter() - start
    start = time.perf_counter()
    priors["lora"] = lora_prior(copy.deepcopy(base), config, stream)
    prior_time["lora"] = time.perf_counter() - start
    start = time.perf_counter()
    priors["lora_adam"] = lora_prior(copy.deepcopy(base), dataclasses.replace(config, prior_optimizer="adam"), stream)
    prior_time["lora_adam"] = time.perf_counter() - start

    rows = []
    for name in targets:
        d_w = reference[name]
        k = max(1, int(args.share * d_w.numel()))
        generator = torch.Generator().manual_seed(0)
        row = {
            "module": name,
            "original": spectral_energy(d_w, k),
            "random": spectral_energy(d_w, k, row_order=torch.randperm(d_w.shape[0], generator=generator),
                                      col_order=torch.randperm(d_w.shape[1], generator=generator)),
            "self_ordered": spectral_energy(d_w, k, row_order=nearest_neighbor_order(d_w),
                                            col_order=nearest_neighbor_order(d_w.T)),
        }
        for mode, by_name in priors.items():
            prior = by_name[name]
            row_order, col_order = nearest_neighbor_order(prior), nearest_neighbor_order(prior.T)
            row[f"{mode}_prior_ordered"] = spectral_energy(d_w, k, row_order=row_order, col_order=col_order)
            row[f"{mode}_prior_self_before"] = spectral_energy(prior, k)
            row[f"{mode}_prior_self_after"] = spectral_energy(prior, k, row_order=row_order, col_order=col_order)
            row[f"{mode}_cosine"] = float(torch.nn.functional.cosine_similarity(prior.flatten(), d_w.flatten(), dim=0))
        rows.append(row)
        print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}), flush=True)

    keys = [key for key in rows[0] if key != "module"]
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in keys}
    summary = {"share": args.share, "reference_steps": args.reference_steps, "reference_time_s": reference_time,
               "prior_time_s": prior_time, "mean": mean, "per_module": rows}
    print("\nmean over", len(rows), "matrices:")
    for key in keys:
        print(f"  {key:28s} {mean[key]:.4f}")
    print("prior time (s):", {k: round(v, 1) for k, v in prior_time.items()})
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
