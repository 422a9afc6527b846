"""The method contract: every hook the trainer calls, each with a no-op default.

A run is a list of *methods* (``config.losses``: ``{"ce": {...}, "co_tuning":
{...}, ...}``). The trainer (:mod:`ftjax.train`) knows no method by name: it
calls each hook below on every method, in this order, and the defaults do
nothing, so a method implements only what it needs.

Before the model exists (read as attributes or called once):

* ``outputs``: the forward outputs the loss reads (``"logits"``, ``"features"``,
  ``"source_logits"`` (asking for it keeps the pretrained head), ``"projection"``,
  ``"feature_maps"``, ``"policy"``).
* :meth:`Method.model_options`: extra model constructor arguments (Bi-Tuning's
  ``projection_dim``).
* ``new_heads``: regexes of randomly initialised heads the method adds; the
  baseline puts them in the group of the target head.
* :meth:`Method.param_rules` / :meth:`Method.param_groups`: rules and groups of
  the parameters the method owns (SpotTune's frozen copies and policy, a patch).
  They claim their parameters before the baseline's rules cover the rest.
* ``bn_mode``: the BatchNorm mode the method needs (``""``: no preference).
* ``views``: augmented views of each image (Bi-Tuning: 2).
* ``needs_source``: the loss reads the frozen pretrained model (``source=``).
* ``rng_streams``: Flax rng streams the model reads in training (``"gumbel"``).
* ``reads_extra_rows``: the loss sees the rows beyond the target labels.
* :meth:`Method.load_data`: data the method adds to each batch (the reuse pool).

With the model: :meth:`Method.wrap_model`, then :meth:`Method.prepare` (one
time, from a narrow :class:`RunContext`), :meth:`Method.write_artifacts`,
:meth:`Method.init_state`. Every step: :meth:`Method.extra_batches` /
:meth:`Method.mix_batch`, then the loss term :meth:`Method.__call__` inside the
one differentiated function. After the test evaluation: :meth:`Method.finalize`.

Loss terms are weighted and summed by the step; composition is a list in the
config.

Example:
  >>> import jax.numpy as jnp
  >>> class Zero(Method):
  ...   name, weight, outputs = "zero", 1.0, ("logits",)
  ...   def __call__(self, *, outputs, batch, state, params, rng, source):
  ...     return TermOutput(loss=0.0 * jnp.sum(outputs["logits"]), state=state)
  >>> Zero()(outputs={"logits": jnp.ones((2, 3))}, batch={}, state=(), params={}, rng=None,
  ...        source=None).loss
  Array(0., dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Parameters without a pretrained value: the new target head (not part of the source).
NEW_PARAMS = ("head",)


class TermOutput(NamedTuple):
  """What a method's loss hook returns inside the differentiated loss function."""
  loss: jax.Array            # scalar, unweighted
  state: Any = ()            # the method's new state (use stop_gradient inside)
  metrics: dict[str, jax.Array] | None = None


class RunContext(NamedTuple):
  """What a method may read once, outside the step: the run's data, model and settings.

  Attributes:
    dataset: the run's :class:`ftjax.data.ImageDataset` (None for in-memory setups).
    model: the (wrapped) model.
    variables: its initial variables (``finalize``: the chosen checkpoint's).
    seed: the run's seed.
    workdir: the run directory ("" when there is none).
    bn_mode: the run's BatchNorm mode, ``"train"`` or ``"eval"``.
    views: augmented views per image the train batches hold.
    batch_size: global train batch size.
    eval_batch_size: global evaluation batch size.
    pretrained: name of the pretrained weights (``""``: random initialisation).
    model_name: the model's registry name.
    image_size: train and evaluation image size.
    progress: show progress bars.
    labels: parameter group of each parameter (``finalize`` only).
    base_variables: the variables before training (``finalize`` only).
  """
  dataset: Any = None
  model: Any = None
  variables: Any = None
  seed: int = 0
  workdir: str = ""
  bn_mode: str = "train"
  views: int = 1
  batch_size: int = 32
  eval_batch_size: int = 128
  pretrained: str = ""
  model_name: str = ""
  image_size: int = 0
  progress: bool = False
  labels: Any = None
  base_variables: Any = None


def source_variables(variables: Any) -> dict[str, Any]:
  """The frozen source model: a copy of the pretrained ``variables`` without the new target head.

  The trainer holds it once, outside the train state (no optimizer state, never
  checkpointed), and hands it to every loss as ``source=``. The copy has its
  own buffers, so donating the train state never donates a buffer it holds.

  Example:
    >>> v = {"params": {"head": {"bias": jnp.zeros(2)}, "backbone": {"w": jnp.ones(3)}}}
    >>> sorted(source_variables(v)["params"])
    ['backbone']
  """
  params = {k: v for k, v in variables["params"].items() if k not in NEW_PARAMS}
  out = {"params": params}
  if variables.get("batch_stats"):
    out["batch_stats"] = variables["batch_stats"]
  return jax.tree.map(lambda x: jnp.array(x, copy=True), out)


class Method:
  """Base class of every method: the declared hooks with their no-op defaults.

  Subclasses are usually frozen dataclasses whose fields are the method's
  options (``config.losses.<name>``); hooks that change the method return a
  new instance (``dataclasses.replace``).
  """
  name: str = "method"
  weight: float = 1.0
  outputs: tuple[str, ...] = ()
  new_heads: tuple[str, ...] = ()
  bn_mode: str = ""
  views: int = 1
  needs_source: bool = False
  rng_streams: tuple[str, ...] = ()
  reads_extra_rows: bool = False

  # ------------------------------------------------------------------ before the model

  def model_options(self) -> dict[str, Any]:
    """Extra keyword arguments of the model constructor (e.g. ``projection_dim``)."""
    return {}

  def param_rules(self, *, variables: Any) -> list[tuple[str, str]]:
    """``(regex, group)`` rules of the parameters this method owns (claimed first)."""
    del variables
    return []

  def param_groups(self) -> dict[str, dict[str, Any]]:
    """Settings of the groups this method's rules name (``lr_mult``, ``weight_decay``, ``frozen``)."""
    return {}

  def load_data(self, *, load_dataset: Callable[..., Any], seed: int) -> "Method":
    """Loads data the method adds to each batch; ``load_dataset(name, **options)`` loads a
    dataset with the run's image settings. Returns the method (a copy when it changed)."""
    del load_dataset, seed
    return self

  # ------------------------------------------------------------------ with the model

  def wrap_model(self, *, model: Any, variables: Any, rng: jax.Array) -> tuple[Any, Any]:
    """The model and variables this method trains (SpotTune: routed copies and a policy)."""
    del rng
    return model, variables

  def prepare(self, context: RunContext) -> "Method":
    """One-time preparation before ``init_state`` (Co-Tuning's relationship, DELTA's weights)."""
    del context
    return self

  def write_artifacts(self, context: RunContext) -> list[str]:
    """Files the method writes next to the run's results (paths written)."""
    del context
    return []

  def init_state(self, *, variables: Any, rng: jax.Array) -> Any:
    """The method's initial state pytree (``()`` for stateless terms)."""
    del variables, rng
    return ()

  # ------------------------------------------------------------------ every step

  def extra_batches(self, *, batch_size: int, start_step: int) -> Iterator[dict[str, Any]] | None:
    """A stream of extra rows for each train batch from ``start_step`` on (None: none)."""
    del batch_size, start_step
    return None

  def mix_batch(self, *, batch: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One train batch from the target ``batch`` and this method's ``extra`` rows."""
    del extra
    return batch

  def __call__(self, *, outputs: dict[str, Any], batch: dict[str, jax.Array], state: Any,
               params: Any, rng: jax.Array, source: Any) -> TermOutput | None:
    """The loss term for one batch (pure, jit-compatible); None: the method adds no term."""
    del outputs, batch, state, params, rng, source
    return None

  # ------------------------------------------------------------------ after training

  def finalize(self, context: RunContext) -> dict[str, Any]:
    """Analyses after the test evaluation; returns entries for the results record."""
    del context
    return {}

