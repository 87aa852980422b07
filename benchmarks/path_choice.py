"""Does the per-layer cost model (``spectral.prefers_dense``) pick the faster path? One LoCA layer, n=1000.

    python benchmarks/path_choice.py [--tokens 1024 4096] [--widths 256 384 512 768 1024 1536 2048] [--threads 2]

For each (tokens, square width), a training step (forward and backward) and an inference call are timed with the
layer forced onto the dense path (dW folded into the frozen weight, as the layer does for a float32 model) and onto
the activation path, interleaved, median of 6 after 2 warm-ups; then what ``auto`` would pick is printed beside.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from peft import get_peft_model

from spectral_peft import LocaConfig
from spectral_peft.bench import _interleaved
from spectral_peft.layer import SpectralLinear
from spectral_peft.spectral import prefers_dense


class _Square(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 384, 512, 768, 1024, 1536, 2048])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| mode | tokens | width | dense ms | activation ms | faster | auto picks |\n|---|---|---|---|---|---|---|")
    right = total = 0
    for training in (True, False):
        for tokens in args.tokens:
            for width in args.widths:
                model = get_peft_model(_Square(width), LocaConfig(n_frequency=1000, target_modules=["proj"]))
                layer = next(m for m in model.modules() if isinstance(m, SpectralLinear))
                with torch.no_grad():  # non-zero coefficients, as after some training
                    layer.loca_coefficients["default"].normal_(0, 0.01)
                x = torch.randn(tokens, width)

                def call(path: str):
                    def run():
                        layer.spectral_path = path
                        if training:
                            model(x.clone().requires_grad_()).sum().backward()
                        else:
                            with torch.no_grad():
                                model(x)
                    return run

                times = _interleaved({"dense": call("dense"), "activation": call("activation")}, 6, 2, "cpu")
                ms = {path: statistics.median(t) * 1e3 for path, t in times.items()}
                with torch.set_grad_enabled(training):
                    auto = "dense" if prefers_dense(tokens, layer.spectrum("default"), folded=True) else "activation"
                faster = min(ms, key=ms.get)
                right, total = right + (auto == faster), total + 1
                print(f"| {'training step' if training else 'inference'} | {tokens} | {width} | {ms['dense']:.2f} | "
                      f"{ms['activation']:.2f} | {faster} | {auto} |", flush=True)
    print(f"\nauto picked the faster path at {right} of {total} points")


if __name__ == "__main__":
    sys.exit(main())
