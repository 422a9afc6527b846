"""Co-Tuning (You et al., NeurIPS 2020) in one place: the method and the category relationship.

* :mod:`~ftjax.methods.co_tuning.method`: the :class:`CoTuning` method (Eq. 2's
  second term, the relationship prepared once and held in the method state);
* :mod:`~ftjax.methods.co_tuning.relationship`: ``p(y_s | y_t)`` from calibrated
  pretrained predictions: the reverse approach (Alg. 1), the direct one (Eq. 3),
  temperature calibration (Alg. 2) of the source model and of ``g`` (separate
  options), its cache and Fig. 1.
"""

from ftjax.methods.co_tuning import relationship
from ftjax.methods.co_tuning.method import CoTuning, check_relationship
from ftjax.methods.co_tuning.relationship import (APPROACHES, OFFICIAL_RESNET50_TEMPERATURE, calibrate_source,
                                                  calibrate_temperature, compute_relationship,
                                                  direct_relationship, reverse_relationship)

__all__ = ["APPROACHES", "CoTuning", "OFFICIAL_RESNET50_TEMPERATURE", "calibrate_source", "calibrate_temperature",
           "check_relationship", "compute_relationship", "direct_relationship", "relationship",
           "reverse_relationship"]
