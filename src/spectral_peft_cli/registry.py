"""What the command line shows of the method registry (``spectral_peft.tools.methods``), as plain data.

The registry imports nothing heavy itself, but it sits inside the ``spectral_peft`` package, whose import registers
the methods with PEFT (torch, transformers and PEFT: seconds). The parser and the checks need only names and
defaults, so they are kept here too; ``tests/tools/test_methods.py`` checks they equal the registry's.
"""

from __future__ import annotations

# every method of the registry, in its order, with its default learning rate
METHOD_LRS = {"loca": 1e-2, "s2ft": 1e-2, "fourierft": 5e-2, "fastfourierft": 5e-2, "lora": 1e-3, "full": 5e-5,
              "loca-frozen": 1e-2, "s2ft-unordered": 1e-2, "s2ft-random": 1e-2, "dct-prior": 1e-2}
METHOD_NAMES = tuple(METHOD_LRS)
# each ablation and the method it is a variant of
VARIANT_OF = {"loca-frozen": "loca", "s2ft-unordered": "s2ft", "s2ft-random": "s2ft", "dct-prior": "s2ft"}
# what bench times (the registry's bench_variants(), the reference first)
BENCH_VARIANTS = ("lora", "loca", "loca-locations", "s2ft", "fourierft", "fastfourierft")


def family(method: str) -> str:
    """The method an ablation is a variant of (a method is its own)."""
    return VARIANT_OF.get(method, method)
