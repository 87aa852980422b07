"""Where one adapted layer's training step goes, operation by operation, beside LoRA's.

    python benchmarks/layer_costs.py [--shapes 1024x1024 2816x1024 1024x2816 384x384] [--tokens 1024]
        [--threads 2] [--methods lora loca fastfourierft] [--path auto]

For each (out x in) shape, one layer trains a step (forward, backward) on ``--tokens`` rows for each method, the
frozen layer alone alongside (interleaved, median of the rounds): the method's own cost is its step minus the frozen
layer's. Then the activation path's floor: each of its operations timed alone, on operands of one block of rows
(n = 1000 DCT cells), times the calls a training step makes (what the path costs without the Python, allocations and
cache misses between its operations). Then torch's profiler records ``--profiled`` steps of each method, and the
table lists the operations by their own CPU time per step, with their calls per step: ``aten::copy_`` counts
copies, ``aten::empty`` fresh allocations, and the rows named after our autograd Functions the Python between the
operations. The profiler adds its own cost to every call, so read its rows against each other, not against the
timed steps.
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
from spectral_peft.spectral import Spectrum, random_cells
from spectral_peft.spectral.activation import _add_selected, _irfft_half, _product_rows, half_spectrum, row_blocks
from spectral_peft.spectral.cache import Scratch
from spectral_peft.spectral.half_spectrum import Structure
from spectral_peft.tools.bench import interleaved
from spectral_peft.transforms import makhoul_order

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


def floor_ms(shape: tuple[int, int], tokens: int, rounds: int) -> dict:
    """Operation -> ms per training step of the activation path on an (out x in) layer, each operation timed alone
    (median of ``rounds`` calls on one block's operands) times its calls per step (one per block of rows). The layer
    transforms its own input, as the first of the layers that share one does."""
    m, n = shape
    cpu = torch.device("cpu")
    spec = Spectrum(torch.randn(1000), random_cells(shape, 1000, torch.Generator().manual_seed(0)), m, n, 1.0)
    structure = Structure(spec, torch.float32)
    q = structure.pattern.matrix(structure.entries[1])
    pattern, weight = structure.adjoint(spec)
    adjoint, stencil = pattern.matrix(structure.entries[1] * weight), structure.stencil(spec)
    blocks = row_blocks(tokens, max(m, n), cpu)
    rows, scratch = blocks[0].stop - blocks[0].start, Scratch(cpu)
    x, grad_y, y, grad_x = torch.randn(rows, n), torch.randn(rows, m), torch.randn(rows, m), torch.randn(rows, n)
    col, row = makhoul_order(n), makhoul_order(m)
    half_in = half_spectrum(x, None, scratch, "input spectrum").clone()
    half_out = half_spectrum(grad_y, None, scratch, "grad spectrum").clone()
    product = _product_rows(q, half_in, scratch).clone()
    adjoint_product = _product_rows(adjoint, half_out, scratch).clone()
    features_out, features_in = _irfft_half(product, m), _irfft_half(adjoint_product, n)
    operations = {
        "forward: reorder the input": lambda: x.index_select(1, col),
        "forward: rfft of the input, feature-major": lambda: half_spectrum(x, None, scratch, "input spectrum"),
        "forward: sparse product": lambda: _product_rows(q, half_in, scratch),
        "forward: irfft": lambda: _irfft_half(product, m),
        "forward: reorder and add into the output": lambda: _add_selected(y, features_out, row, scratch),
        "backward: reorder the output gradient": lambda: grad_y.index_select(1, row),
        "backward: rfft of the output gradient, feature-major": lambda: half_spectrum(grad_y, None, scratch,
                                                                                      "grad spectrum"),
        "backward: sparse product (adjoint)": lambda: _product_rows(adjoint, half_out, scratch),
        "backward: irfft": lambda: _irfft_half(adjoint_product, n),
        "backward: reorder and add into the input gradient": lambda: _add_selected(grad_x, features_in, col, scratch),
        "backward: sampled dots (coefficient gradients)": lambda: stencil.sampled_dots(half_out, half_in, False),
    }
    times = interleaved(operations, rounds, 3, "cpu")
    return {name: statistics.median(values) * 1e3 * len(blocks) for name, values in times.items()}


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
        floor = floor_ms(shape, args.tokens, 50)
        blocks = len(row_blocks(args.tokens, max(shape), torch.device("cpu")))
        print(f"\nthe activation path's floor ({blocks} blocks of rows; each operation timed alone)\n")
        print("| operation | ms per step |\n|---|---|")
        for name, ms in floor.items():
            print(f"| {name} | {ms:.3f} |")
        print(f"| all of them | {sum(floor.values()):.2f} |")
        for name in args.methods:
            print(f"\n{name}: operations by own CPU time per step (profiled)\n")
            print("| operation | ms per step | calls per step |\n|---|---|---|")
            ops = profile_ops(functools.partial(_step, models[name], x, grad), args.profiled)
            for key, (ms, calls) in sorted(ops.items(), key=lambda item: -item[1][0])[: args.top]:
                print(f"| {key} | {ms:.3f} | {calls:g} |")


if __name__ == "__main__":
    main()
