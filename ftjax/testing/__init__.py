"""Test and benchmark helpers (torch reference models live in :mod:`ftjax.testing.torch_models`).

Nothing in this package is imported by the library itself; torch is only needed
when :mod:`ftjax.testing.torch_models` is imported.
"""
