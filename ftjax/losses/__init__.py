"""Pure loss functions (keyword-only arrays in, scalar or per-example array out)."""

from ftjax.losses.bi_tuning import categorical_contrastive_loss, contrastive_cross_entropy, info_nce
from ftjax.losses.classification import softmax_cross_entropy
from ftjax.losses.co_tuning import co_tuning_loss
from ftjax.losses.data_reuse import ReuseLoss, pseudo_label_loss, reuse_loss
from ftjax.losses.regularizers import (batch_spectral_shrinkage, delta, delta_channel_weights,
                                       filter_ablation_loss_increase, l2_sp, lwf)
from ftjax.losses.spottune import block_usage, global_k_loss, gumbel_softmax, policy_entropy_loss

__all__ = [
    "ReuseLoss",
    "batch_spectral_shrinkage",
    "block_usage",
    "categorical_contrastive_loss",
    "co_tuning_loss",
    "contrastive_cross_entropy",
    "delta",
    "delta_channel_weights",
    "filter_ablation_loss_increase",
    "global_k_loss",
    "gumbel_softmax",
    "info_nce",
    "l2_sp",
    "lwf",
    "policy_entropy_loss",
    "pseudo_label_loss",
    "reuse_loss",
    "softmax_cross_entropy",
]
