"""Methods: the contract (:mod:`ftjax.methods.base`), one module per method, the registry."""

from ftjax.methods.base import Method, RunContext, TermOutput
from ftjax.methods.registry import build_methods, config_losses, known_methods, register_method

__all__ = ["Method", "RunContext", "TermOutput", "build_methods", "config_losses", "known_methods",
           "register_method"]
