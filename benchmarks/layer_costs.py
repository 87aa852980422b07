"""Where one adapted layer's training step goes, operation by operation, beside LoRA's.

    python benchmarks/layer_costs.py [--shapes 1024x1024 2816x1024 1024x2816 384x384] [--tokens 1024]
        [--threads 2] [--methods lora loca fastfourierft] [--path auto]

For each (out x in) shape, one layer trains a step (forward, backward) on ``--tokens`` rows for each method, the
frozen layer alone alongside (interleaved, median of the rounds): the method's own cost is its step minus the frozen
layer's. Then torch's profiler records ``--profiled`` steps of each method, and the table lists the operations
by their own CPU time per step, with their calls per step: ``aten::copy_`` counts copies, ``aten::empty`` fresh
allocations, and the rows named after our autograd Functions the Python between the operations. The profiler adds
its own cost to every call, so read its rows against each other, not against the timed steps.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile

import spectral_peft
from spectral_peft.tools.bench import interleaved

CONFIGS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=8, target_modules=["proj"]),
    "loca": lambda: spectral_peft.LocaConfig(n_frequency=1000, target_modules=["proj"]),
    "fastfourierft": lambda: spectral_peft.FastFourierFTConfig(n_frequency=1000, target_modules=["proj"]),
}


class _Layer(torch.nn.Module):
    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features, bias=False)

    def forward(self, x):
        return self.proj(x)


def _models(shape: tuple[int, int], methods: list[str], path: str) -> dict:
    base = _Layer(*shape)
    models = {"frozen": base.requires_grad_(False)}
    for method in methods:
        model = get_peft_model(copy.deepcopy(base), CONFIGS[method]())
        for module in model.modules():
            if hasattr(module, "spectral_path"):
                module.spectral_path = path
        models[method] = model
    return models


def _step(model, x, grad):
    model(x).backward(grad)
    x.grad = None


def median_ms(steps: dict, rounds: int, warmup: int = 0) -> dict:
    """Median wall time in ms of each step function over ``rounds`` rounds interleaved by ``bench.interleaved``
    (A, B, C, A, B, C, ...: a slow spell of the machine slows every one alike), after ``warmup`` untimed rounds."""
    times = interleaved(steps, rounds, warmup, "cpu")
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def profile_ops(step, steps: int) -> dict:
    """Operation -> (own CPU ms per step, calls per step) over ``steps`` calls of ``step``, from torch's profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "2816x1024", "1024x2816", "384x384"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=sorted(CONFIGS), default=["lora", "loca", "fastfourierft"])
    parser.add_argument("--path", default="auto", help="our layers' spectral_path (auto, activation, dense, factored)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--profiled", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        models = _models(shape, args.methods, args.path)
        x = torch.randn(args.tokens, shape[1], requires_grad=True)
        grad = torch.randn(args.tokens, shape[0])
        for model in models.values():  # warm-up: kept structures and buffers built
            _step(model, x, grad)
        times = median_ms({name: functools.partial(_step, model, x, grad) for name, model in models.items()},
                          args.rounds - 1, warmup=1)
        frozen = times.pop("frozen")
        own = {name: value - frozen for name, value in times.items()}
        print(f"\n## {text} (out x in), {args.tokens} tokens, {args.threads} threads, path {args.path}\n")
        print(f"frozen layer's step {frozen:.2f} ms; each method's own cost: "
              + ", ".join(f"{name} {value:.2f} ms ({value / own[args.methods[0]]:.2f}x)" for name, value in own.items()))
        for name in args.methods:
            print(f"\n{name}: operations by own CPU time per step (profiled)\n")
            print("| operation | ms per step | calls per step |\n|---|---|---|")
            ops = profile_ops(functools.partial(_step, models[name], x, grad), args.profiled)
            for key, (ms, calls) in sorted(ops.items(), key=lambda item: -item[1][0])[: args.top]:
                print(f"| {key} | {ms:.3f} | {calls:g} |")


if __name__ == "__main__":
    main()
