"""S2FT's reorders: gathering from memory and scatter-adding into it, against reading and writing in sequence.

    python benchmarks/reorder_forms.py [--rounds 40] [--training] [--threads 2]

An S2FT layer reorders its features by its own permutation composed with Makhoul's. Since b31cd05 the input (and in
backward the output gradient) is read in sequence and scattered into the block in cache, and the output is added to
in sequence from a gather of the block (``spectral._scatter`` / ``spectral._gather_add``); before, the input was
gathered from memory and the block scatter-added into the output (``spectral._gather`` / ``spectral._scatter_add``,
which Makhoul's order alone still uses). One S2FT layer per Llama-style shape at 1024 tokens, the base layer's
product computed (untimed) before each call as in the layer; the two forms toggled around each call, interleaved,
three warm-up rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from spectral_peft import spectral
from spectral_peft.tools.bench import interleaved, paired_ratio

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # out, in


def gathers_from_memory(spec: spectral.Spectrum, device: torch.device) -> spectral._Gathers:
    """The reorders before b31cd05: the composed order gathered, its inverse gathered, the output scatter-added."""
    def reorders(order: torch.Tensor, size: int):
        order = order[spectral._makhoul_orders(size, device)[0]]
        inverse = spectral._inverse_order(order)
        return spectral._gather(order), spectral._gather(inverse), spectral._scatter_add(order)

    col_gather, col_scatter, _ = reorders(spec.col_order, spec.in_features)
    row_scatter, row_gather, row_add = reorders(spec.row_order, spec.out_features)
    return spectral._Gathers(col_gather, col_scatter, row_gather, row_scatter, row_add)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--training", action="store_true", help="time forward and backward instead of inference")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    in_sequence = spectral._gathers
    for m, n in SHAPES:
        coefficients = torch.randn(1000, requires_grad=args.training)
        spec = spectral.Spectrum(coefficients, spectral.random_cells((m, n), 1000), m, n, 1.0, "dct",
                                 row_order=torch.randperm(m), col_order=torch.randperm(n))
        x = torch.randn(1024, n, requires_grad=args.training)
        weight = torch.randn(m, n) * 0.01

        state = {}

        def base_product():  # the layer computes its base product first; untimed, and added into in place
            state["out"] = x.detach() @ weight.t()

        def call(gathers):
            def run():
                spectral._gathers = gathers
                try:
                    with torch.set_grad_enabled(args.training):
                        y = spectral.apply_delta(x, spec, out=state["out"])
                        if args.training:
                            y.sum().backward()
                finally:
                    spectral._gathers = in_sequence
            return run

        times = interleaved({"from memory": call(gathers_from_memory), "in sequence": call(in_sequence)},
                             args.rounds, 3, "cpu", before=base_product)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"{m} x {n}, {'training step' if args.training else 'inference'}: from memory {ms['from memory']:.2f} ms, "
              f"in sequence {ms['in sequence']:.2f} ms, paired ratio "
              f"{paired_ratio(times['in sequence'], times['from memory']):.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
