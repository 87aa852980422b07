"""The ``spectral-peft`` command and its parts: fine-tuning runs, evaluation, method comparisons, benchmarks and
the analysis of weight changes, on top of the library.

The tools use only the core's public API (``spectral_peft``, ``spectral_peft.analysis``, ``spectral_peft.loca``,
``spectral_peft.s2ft`` and the other core modules' public names); nothing in the core imports them.
"""
