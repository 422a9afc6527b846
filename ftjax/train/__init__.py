"""Train state, step factory, loop, evaluation, checkpointing, metrics."""

from ftjax.train.config import default_config
from ftjax.train.metrics import decathlon_domain_scores, decathlon_score
from ftjax.train.state import TrainState
from ftjax.train.step import make_eval_step, make_train_step


def __getattr__(name):
  # The loop pulls in models and data (TensorFlow); import it only when asked for.
  if name in ("train_and_evaluate", "ConfigError"):
    from ftjax.train import loop
    return getattr(loop, name)
  raise AttributeError(name)


__all__ = ["ConfigError", "TrainState", "decathlon_domain_scores", "decathlon_score", "default_config",
           "make_eval_step", "make_train_step", "train_and_evaluate"]
