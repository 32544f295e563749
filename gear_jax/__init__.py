"""gear_jax: GEAR (SIGIR 2025), a multi-behavior sequential recommender, in JAX/Flax.

`gear_jax.Recommender` (from `gear_jax.recommender`) is imported on first use, so that
``import gear_jax.serving`` stays free of flax and the model code."""

__all__ = ['Recommender']


def __getattr__(name):
  if name == 'Recommender':
    from gear_jax.recommender import Recommender
    return Recommender
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
