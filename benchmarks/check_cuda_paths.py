"""The three ways of computing a layer's update agree on a device: outputs, input, coefficient and LoCA location
gradients of the activation and factored paths against the dense one, in float32 (relative to the largest value).

    python benchmarks/check_cuda_paths.py [cuda]      # on a machine with a GPU
    python benchmarks/check_cuda_paths.py cpu         # the same check here (tests/spectral runs it on CPU too)

Exits with an error when a difference exceeds 1e-4.
"""

from __future__ import annotations

import sys

import torch

from spectral_peft.spectral import DELTA_PRODUCTS, Spectrum, random_cells

SHAPES = ((384, 384), (2048, 5632), (5632, 2048), (7, 9))


def differences(device: torch.device, transform: str, orders: bool, shape: tuple[int, int]) -> dict:
    """Each path's largest relative difference to the dense path, per output and gradient."""
    m, n = shape
    k = min(1000, m * n // 2)
    coefficients = torch.randn(k, device=device).requires_grad_()
    cells = random_cells(shape, k).to(device)
    locations = cells.float().requires_grad_()
    spec = Spectrum(coefficients, cells, m, n, 2.0, transform,
                    row_order=torch.randperm(m, device=device) if orders else None,
                    col_order=torch.randperm(n, device=device) if orders else None,
                    locations=locations, train_locations=True)
    x = torch.randn(3, 100, n, device=device)
    results = {}
    for path, product in DELTA_PRODUCTS.items():
        xx = x.clone().requires_grad_()
        y = product(xx, spec)
        (y * torch.linspace(-1, 1, m, device=device)).sum().backward()
        results[path] = (y.detach(), xx.grad, coefficients.grad.clone(), locations.grad.clone())
        coefficients.grad = locations.grad = None
    return {path: [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results[path], results["dense"])]
            for path in ("activation", "factored")}


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    torch.manual_seed(0)
    worst = 0.0
    for transform in ("dct", "dft"):
        for orders in (False, True):
            for shape in SHAPES:
                for path, errors in differences(device, transform, orders, shape).items():
                    worst = max(worst, *errors)
                    print(transform, "orders" if orders else "-", shape, path,
                          "output, input grad, coefficient grad, location grad:", ["%.1e" % e for e in errors])
    print("worst relative difference", worst)
    if worst >= 1e-4:
        sys.exit(f"a path differs from the dense one by {worst:.1e} (limit 1e-4)")


if __name__ == "__main__":
    main()
