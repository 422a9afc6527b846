"""Doctests of the library (``pytest`` collects ``ftjax/`` with ``--doctest-modules``):
every example may use ``np``, ``jnp`` and ``jax`` without importing them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  doctest_namespace.update(np=np, jnp=jnp, jax=jax)
