"""CUDA agreement of the three paths (outputs, input, coefficient and LoCA location gradients), for the record of
docs/performance.md: `python benchmarks/check_cuda_paths.py` on a machine with a GPU (`... cpu` runs it here; CI has
no GPU, and on CPU the same agreement is tested by tests/test_spectral.py). Each path is compared with the dense one,
in float32."""
import sys

import torch
from spectral_peft.spectral import DELTA_PRODUCTS, Spectrum, random_cells
torch.manual_seed(0)
dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
worst = 0.0
for transform in ("dct", "dft"):
    for orders in (False, True):
        for (m, n) in ((384, 384), (2048, 5632), (5632, 2048), (7, 9)):
            k = min(1000, m * n // 2)
            coef = torch.randn(k, device=dev).requires_grad_()
            cells = random_cells((m, n), k).to(dev)
            locations = cells.float().requires_grad_()
            spec = Spectrum(coef, cells, m, n, 2.0, transform,
                            row_order=torch.randperm(m, device=dev) if orders else None,
                            col_order=torch.randperm(n, device=dev) if orders else None,
                            locations=locations, train_locations=True)
            x = torch.randn(3, 100, n, device=dev)
            outs = {}
            for path, product in DELTA_PRODUCTS.items():
                xx = x.clone().requires_grad_()
                y = product(xx, spec)
                (y * torch.linspace(-1, 1, m, device=dev)).sum().backward()
                outs[path] = (y.detach(), xx.grad, coef.grad.clone(), locations.grad.clone())
                coef.grad = locations.grad = None
            for path in ("activation", "factored"):
                errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs[path], outs["dense"])]
                worst = max(worst, max(errs))
                print(transform, "orders" if orders else "-", (m, n), path,
                      "output, input grad, coefficient grad, location grad:", ["%.1e" % e for e in errs])
print("worst relative difference", worst)
assert worst < 1e-4
