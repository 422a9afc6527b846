"""Pure loss functions (keyword-only arrays in, scalar or per-example array out)."""

from ftjax.losses.classification import softmax_cross_entropy

__all__ = ["softmax_cross_entropy"]
