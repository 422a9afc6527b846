"""SpotTune (Guo et al., CVPR 2019) in one place: the model wrapper, the method and the figures.

* :mod:`~ftjax.methods.spottune.model`: the routed model (frozen and trainable
  block copies, the policy network, Global-k pruning);
* :mod:`~ftjax.methods.spottune.method`: the :class:`SpotTune` method (model
  wrapping, parameter rules, the Global-k loss terms, the analyses after training);
* :mod:`~ftjax.methods.spottune.plots`: the paper's Fig. 3 and Fig. 4.
"""

from ftjax.methods.spottune.method import SpotTune
from ftjax.methods.spottune.model import (ROUTING_MODES, SpotTuneClassifier, block_names, create_spottune_model,
                                          image_hashes, pruned_size, random_block_mask, routed_block_names,
                                          spottune_groups, spottune_param_rules, spottune_rules,
                                          spottune_variables_from_pretrained, unused_blocks)
from ftjax.methods.spottune.plots import plot_block_usage, plot_finetuned_histogram

__all__ = ["ROUTING_MODES", "SpotTune", "SpotTuneClassifier", "block_names", "create_spottune_model",
           "image_hashes", "plot_block_usage", "plot_finetuned_histogram", "pruned_size", "random_block_mask",
           "routed_block_names", "spottune_groups", "spottune_param_rules", "spottune_rules",
           "spottune_variables_from_pretrained", "unused_blocks"]
