"""Pure loss functions (keyword-only arrays in, scalar or per-example array out)."""

from ftjax.losses.classification import softmax_cross_entropy
from ftjax.losses.co_tuning import co_tuning_loss

__all__ = ["co_tuning_loss", "softmax_cross_entropy"]
