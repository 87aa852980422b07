"""Does the per-layer cost model (``spectral.choose_path``) pick the faster path? One LoCA (or FourierFT mode) layer.

    python benchmarks/path_choice.py [--tokens 1024 4096] [--widths 256 384 512 768 1024 1536 2048] [--threads 2]
    python benchmarks/path_choice.py --device cuda --dtype bfloat16 --widths 256 1024 2048 4096 --n 100 1000 10000

For each (tokens, square width, n), a training step (forward and backward) and an inference call are timed with the
layer forced onto each path, interleaved, median of 6 after 2 warm-ups; then what ``auto`` picks is printed beside.
The paths compared are the ones ``auto`` chooses between on that device: the dense and activation paths on a CPU
(dW folded into the frozen weight for a float32 model, as the layer does), the dense and factored paths on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from peft import get_peft_model

from spectral_peft import FastFourierFTConfig, LocaConfig
from spectral_peft.tools.bench import interleaved
from spectral_peft.layer import SpectralLinear

CONFIGS = {"loca": LocaConfig, "fastfourierft": FastFourierFTConfig}


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
    parser.add_argument("--n", type=int, nargs="+", default=[1000], help="coefficients per layer")
    parser.add_argument("--method", choices=sorted(CONFIGS), default="loca")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=None,
                        help="layer calls per timing (default 1 on a CPU, 20 on a GPU, whose calls are short)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    paths = ("dense", "activation") if device.type == "cpu" else ("dense", "factored")
    calls = args.calls or (1 if device.type == "cpu" else 20)
    print(f"| mode | tokens | width | n | {' | '.join(p + ' ms' for p in paths)} | faster | auto picks |\n"
          f"|---|---|---|---|{'---|' * len(paths)}---|---|")
    right = total = 0
    for training in (True, False):
        for tokens in args.tokens:
            for width in args.widths:
                for n in args.n:
                    if n > width * width // 2:
                        continue
                    config = CONFIGS[args.method](n_frequency=n, target_modules=["proj"])
                    model = get_peft_model(_Square(width).to(device=device, dtype=dtype), config)
                    layer = next(m for m in model.modules() if isinstance(m, SpectralLinear))
                    with torch.no_grad():  # non-zero coefficients, as after some training
                        for p in model.parameters():
                            if p.requires_grad:
                                p.normal_(0, 0.01)
                    x = torch.randn(tokens, width, device=device, dtype=dtype)

                    def call(path: str):
                        def run():
                            layer.spectral_path = path
                            for _ in range(calls):
                                if training:
                                    model(x.clone().requires_grad_()).sum().backward()
                                else:
                                    with torch.no_grad():
                                        model(x)
                        return run

                    times = interleaved({path: call(path) for path in paths}, 6, 2, device)
                    ms = {path: statistics.median(t) * 1e3 / calls for path, t in times.items()}
                    layer.spectral_path = "auto"
                    with torch.set_grad_enabled(training):
                        auto = layer._path(tokens, layer.spectrum("default"), device, layer._can_fold(x, (), {}))
                    faster = min(ms, key=ms.get)
                    right, total = right + (auto == faster), total + 1
                    print(f"| {'training step' if training else 'inference'} | {tokens} | {width} | {n} | "
                          f"{' | '.join(f'{ms[p]:.3f}' for p in paths)} | {faster} | {auto} |", flush=True)
    print(f"\nauto picked the faster path at {right} of {total} points")


if __name__ == "__main__":
    sys.exit(main())
