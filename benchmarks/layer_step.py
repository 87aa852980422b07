"""One adapted layer, forward and backward: LoRA r=8's thin products against our activation and dense paths.

    python benchmarks/layer_step.py [--against-commit a98bbd2] [--threads 2]

With --against-commit, the activation path of that commit's ``spectral.py`` (taken from git) is timed beside the
current one, for its coefficient and location phases. Interleaved, median of the repetitions after two warm-ups.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from spectral_peft import spectral

SHAPES = [(4096, 384, 384), (1024, 2048, 2048), (1024, 5632, 2048), (1024, 2048, 5632)]  # tokens, out, in


def spectral_module_at(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:src/spectral_peft/spectral.py"], capture_output=True,
                            text=True, check=True).stdout
    source = source.replace("from .transforms import", "from spectral_peft.transforms import")
    path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    path.write(source)
    path.close()
    spec = importlib.util.spec_from_file_location(f"spectral_{commit}", path.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against-commit", default=None)
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    modules = {"now": spectral}
    if args.against_commit:
        modules["before"] = spectral_module_at(args.against_commit)
    n = args.n_frequency
    for tokens, m, n_in in SHAPES:
        x0 = torch.randn(tokens, n_in)
        coefficients = torch.nn.Parameter(torch.randn(n) * 0.01)
        cells = spectral.random_cells((m, n_in), n)
        a = torch.nn.Parameter(torch.randn(8, n_in) * 0.01)
        b = torch.nn.Parameter(torch.randn(m, 8) * 0.01)

        def lora():
            x = x0.clone().requires_grad_()
            ((x @ a.t()) @ b.t()).sum().backward()

        def ours(module, locations: bool, dense: bool = False):
            spec = module.Spectrum(coefficients, cells, m, n_in, 1.0, "dct",
                                   locations=torch.nn.Parameter(cells.float()) if locations else None,
                                   train_coefficients=not locations, train_locations=locations)

            def step():
                x = x0.clone().requires_grad_()
                y = F.linear(x, module.delta_weight(spec)) if dense else module.apply_delta(x, spec)
                y.sum().backward()
            return step

        calls = {"LoRA r=8": lora, "dense path": ours(spectral, False, dense=True)}
        for name, module in modules.items():
            calls[f"activation {name}"] = ours(module, False)
            calls[f"activation {name}, locations"] = ours(module, True)
        times = {k: [] for k in calls}
        for round_ in range(args.repeats + 2):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
        cells_text = "  ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items())
        print(f"{tokens} tokens, {m} x {n_in}: {cells_text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
