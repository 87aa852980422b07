"""CUDA agreement of the activation and dense paths (outputs, input and coefficient gradients), for the record of
docs/performance.md: `python benchmarks/check_cuda_paths.py` on a machine with a GPU (CI has none; on CPU the same
agreement is tested by tests/test_spectral.py)."""
import torch
from spectral_peft.spectral import Spectrum, apply_delta, dense_forward, random_cells
torch.manual_seed(0)
dev = torch.device("cuda")
worst = 0.0
for transform in ("dct", "dft"):
    for orders in (False, True):
        for (m, n) in ((384, 384), (2048, 5632), (5632, 2048), (7, 9)):
            k = min(1000, m * n // 2)
            coef = torch.randn(k, device=dev).requires_grad_()
            spec = Spectrum(coef, random_cells((m, n), k).to(dev), m, n, 2.0, transform,
                            row_order=torch.randperm(m, device=dev) if orders else None,
                            col_order=torch.randperm(n, device=dev) if orders else None)
            x = torch.randn(3, 100, n, device=dev)
            outs = []
            for f in (apply_delta, dense_forward):
                xx = x.clone().requires_grad_()
                y = f(xx, spec)
                (y * torch.linspace(-1, 1, m, device=dev)).sum().backward()
                outs.append((y.detach(), xx.grad, coef.grad.clone()))
                coef.grad = None
            errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*outs)]
            worst = max(worst, max(errs))
            print(transform, orders, (m, n), ["%.1e" % e for e in errs])
print("worst relative difference", worst)
assert worst < 1e-4
