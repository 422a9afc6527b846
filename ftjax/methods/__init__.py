"""Methods: the forward outputs they need, their loss terms, their state."""

from ftjax.methods.base import LossComponent, TermOutput
from ftjax.methods.registry import build_components, known_components

__all__ = ["LossComponent", "TermOutput", "build_components", "known_components"]
