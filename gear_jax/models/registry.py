"""The one place that maps ``config.model.name`` to a model: `get`, `build`, `spec_of`.

A built-in model is one line of `BUILTIN`: its module (which defines ``SPEC``, a
`ModelSpec` with the Linen class and the loss) and the model-config values of its own.
Modules are imported on first use, so that `names` and `model_defaults` (read while
validating a config, before JAX starts) stay cheap. `register` adds a model at run time
(tests do, with a throw-away model).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from gear_jax.models.interface import ModelSpec, SequenceModel

# name: (module defining SPEC, the model's own model-config values)
BUILTIN: dict[str, tuple[str, Mapping[str, Any]]] = {
    'gear': ('gear_jax.models.gear', {}),
    'sasrec': ('gear_jax.models.sasrec', {'n_head': 1, 'n_layer': 2, 'mask_padding': True}),
}
_registered: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
  """Adds (or replaces) model `spec.name`."""
  _registered[spec.name] = spec


def unregister(name: str) -> None:
  _registered.pop(name, None)


def names() -> tuple[str, ...]:
  """Every model name ``model.name`` may take."""
  return tuple(BUILTIN) + tuple(n for n in _registered if n not in BUILTIN)


def model_defaults(name: str) -> Mapping[str, Any]:
  """The model-config values of model `name`'s own (no import of the model)."""
  if name in _registered:
    return _registered[name].defaults
  return BUILTIN[_check(name)][1]


def get(name: str) -> ModelSpec:
  """The spec of model `name` (its module imported on first use)."""
  if name in _registered:
    return _registered[name]
  module, own = BUILTIN[_check(name)]
  spec = importlib.import_module(module).SPEC
  spec = dataclasses.replace(spec, defaults=own)
  _registered[name] = spec
  return spec


def spec_of(model: SequenceModel) -> ModelSpec:
  """The spec whose module `model` is an instance of."""
  for name in names():
    spec = get(name)
    if type(model) is spec.module:
      return spec
  raise ValueError(f'{type(model).__name__} is not a registered model')


def _check(name: str) -> str:
  if name not in BUILTIN and name not in _registered:
    raise ValueError(f'unknown model {name!r}; registered: {names()}')
  return name


def build(num_items: int, num_behaviors: int, model_config, precision: str = 'float32',
          table_rows: int = 0) -> SequenceModel:
  """The module of ``config.model`` (name, d_model, n_head, n_layer, dropout,
  mask_padding, kernels; 'auto' kernels resolved for the platform JAX computes on)
  for a data set of `num_items` items and `num_behaviors` behaviors. A key the config
  lacks takes the model's own value, else the module's field default."""
  from gear_jax import backend
  from gear_jax.models import layers
  spec = get(model_config.get('name', 'gear'))
  fields = {f.name: f.default for f in dataclasses.fields(spec.module)
            if f.default is not dataclasses.MISSING}
  def value(key):
    return model_config.get(key, spec.defaults.get(key, fields.get(key)))
  return spec.module(
      num_items=num_items, num_behaviors=num_behaviors, table_rows=table_rows,
      d_model=int(value('d_model')), n_head=int(value('n_head')),
      n_layer=int(value('n_layer')), dropout=float(value('dropout')),
      mask_padding=bool(value('mask_padding')),
      dtype=layers.compute_dtype(precision), precision=layers.matmul_precision(precision),
      kernels=backend.resolve_kernels(model_config.get('kernels', 'auto')))


def init_params(model: SequenceModel, key, max_len: int) -> dict:
  """Initial parameters (float32) for windows of length `max_len`."""
  import jax.numpy as jnp
  z = jnp.zeros((1, max_len), jnp.int32)
  return model.init({'params': key}, z, z, z, deterministic=True)['params']
