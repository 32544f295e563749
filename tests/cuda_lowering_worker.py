"""Lowers every compiled program of gear_jax for CUDA on a CPU-only machine.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/cuda_lowering_worker.py

`jax.export` lowers for platforms the machine does not have. Programs, built with the
kernels `model.kernels='auto'` picks on a GPU ('xla', resolved for platform 'gpu'):
the trainer's train step (`trainer.jit_train_step`, shardings pinned) for every item
loss and precision on meshes 1x1, 8x1 and 4x2 with `shard_items`; the evaluation step
(sampled and full ranking at once) and the recommendation step on the same meshes / on
one device; and the train step with the CPU-tuned kernels ('cpu', which a user may
force on a GPU) on one device in both precisions. Prints one JSON object
{program: 'ok' | error} on the last line.
"""

import functools
import json
import sys

import jax
import numpy as np
from jax import export

from gear_jax import backend, defaults, parallel, steps, trainer
from gear_jax.models import registry

V, L, B = 997, 12, 16  # prime-ish catalog: the padded, sharded table path is exercised


def _lower(fn, *args) -> str:
  try:
    exported = export.export(fn, platforms=('cuda',))(*args)
    assert exported.platforms == ('cuda',)
    return 'ok'
  except Exception as e:  # reported per program, the test lists the failures
    return f'{type(e).__name__}: {str(e)[:400]}'


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  out = {}
  meshes = {'1x1': (1, 1, False), '8x1': (8, 1, False), '4x2+shard_items': (4, 2, True)}
  for name, (data, model_axis, shard_items) in meshes.items():
    mesh = parallel.make_mesh(data, model_axis, devices=jax.devices()[:data * model_axis])
    for precision in ('float32', 'bfloat16'):
      config = defaults.get_default_config()
      config.data.max_len = L
      config.model.precision = precision
      config.mesh.shard_items = shard_items
      config.train.loss_memory_mb = 1  # small chunks: the chunked paths are taken
      config.model.kernels = backend.resolve_kernels('auto', 'gpu')
      assert config.model.kernels == 'xla'
      model = registry.build(V, 4, config.model, precision,
                              parallel.table_rows(V, mesh, shard_items))
      tx = steps.make_optimizer(1e-3, 1e-6)
      state = steps.create_state(model, tx, mesh, seed=0, max_len=L,
                                 shard_items=shard_items)
      zeros = np.zeros((B, L), np.int32)
      batch = parallel.abstract_batch(
          dict(items=zeros, behaviors=zeros, gaps=zeros, mask=np.ones(B, bool)), mesh)
      for loss in ('token', 'vocab', 'dense'):
        config.train.loss = loss
        out[f'train {name} {precision} {loss}'] = _lower(
            trainer.jit_train_step(config, model, tx, mesh, state, batch), state, batch)
      eval_batch = parallel.abstract_batch(
          dict(items=zeros, behaviors=zeros, gaps=zeros, mask=np.ones(B, bool),
               target=np.ones(B, np.int32), candidates=np.ones((B, 21), np.int32)),
          mesh)
      evaluate = jax.jit(functools.partial(
          steps.eval_step, model=model, protocols=('sampled', 'full'), ks=(1, 5, 10),
          full_chunk=256))
      out[f'eval {name} {precision} sampled+full'] = _lower(evaluate, state.params,
                                                              eval_batch)
      if name == '1x1':
        rec_batch = dict(items=zeros, behaviors=zeros, gaps=zeros,
                         exclude=np.zeros((B, 8), np.int32))
        recommend = jax.jit(functools.partial(steps.recommend_step, model=model, k=10,
                                              chunk=256))
        out[f'recommend {name} {precision}'] = _lower(recommend, state.params, rec_batch)
        config.model.kernels, config.train.loss = 'cpu', 'token'
        tuned = registry.build(V, 4, config.model, precision)
        assert tuned.kernels == 'cpu'
        out[f'train {name} {precision} token cpu-kernels'] = _lower(
            trainer.jit_train_step(config, tuned, tx, mesh, state, batch), state, batch)
  print(json.dumps(out))


if __name__ == '__main__':
  sys.exit(main())
