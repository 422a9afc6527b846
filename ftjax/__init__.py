"""ftjax: fine-tuning methods in JAX/Flax."""

__version__ = "0.1.0"
