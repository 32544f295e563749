"""Run by test_parallel.py in a subprocess with 8 forced CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_worker.py
      steps|checkpoint WORKDIR

Prints one JSON object on its last line.
"""

import json
import sys

import jax
import numpy as np

from gear_jax import parallel, steps
from gear_jax.models import gear

MESHES = {'1': (1, 1, False), '8x1': (8, 1, False), '4x2': (4, 2, True),
          '2x4': (2, 4, True)}


def train_steps(num_items: int) -> dict:
  """A few training steps of a small GEAR on several meshes; differences to 1 device."""
  tx = steps.make_optimizer(1e-3, 1e-6)  # the published recipe
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    lengths = rng.integers(2, 10, 16)
    real = np.arange(9)[None] >= (9 - lengths)[:, None]
    batches.append({
        'items': np.where(real, rng.integers(1, num_items + 1, (16, 9)), 0).astype(np.int32),
        'behaviors': np.where(real, rng.integers(1, 5, (16, 9)), 0).astype(np.int32),
        'gaps': np.where(real, rng.integers(0, 5000, (16, 9)), 0).astype(np.int32),
        'mask': np.ones(16, bool)})
  results = {}
  # 8x1 and 4x2 also run end to end through the CLI in tests/test_options.py
  for name in ('1', '4x2', '2x4'):
    data, model_axis, shard_items = MESHES[name]
    mesh = parallel.make_mesh(data, model_axis)
    model = gear.GEAR(num_items=num_items, num_behaviors=4, d_model=16, n_head=2,
                           n_layer=2, dropout=0.1, precision=jax.lax.Precision.HIGHEST,
                           table_rows=parallel.table_rows(num_items, mesh, shard_items))
    state = steps.create_state(model, tx, mesh, seed=3, max_len=9, shard_items=shard_items)
    shards = model_axis if shard_items else 1
    step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, alpha=0.1,
                                                 loss_impl='auto', loss_memory_mb=0.05,
                                                 vocab_shards=shards),
                   donate_argnums=0)
    losses = []
    for b in batches:
      state, aux = step(state, parallel.put_batch(b, mesh))
      losses.append(float(aux['loss']))
    table = state.params['item_emb']['embedding']
    params = parallel.to_canonical(state.params, num_items, mesh)  # padding cut off
    results[name] = dict(losses=losses, params=jax.tree_util.tree_map(np.asarray, params),
                         rows=int(table.shape[0]),
                         table_sharding=str(table.sharding.spec),
                         devices=len(mesh.devices.flat))
  base = results['1']
  out = {}
  for name, r in results.items():
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), r['params'],
                                   base['params'])
    out[name] = dict(loss_diff=float(np.abs(np.subtract(r['losses'], base['losses'])).max()),
                     param_diff=max(jax.tree_util.tree_leaves(diffs)),
                     losses=r['losses'], table_sharding=r['table_sharding'],
                     rows=r['rows'],
                     devices=r['devices'])
  return out


def collectives(num_items: int = 4002) -> dict:
  """The all-gathers in the compiled step with the item table on 'model' (2 x 4)."""
  import re
  mesh = parallel.make_mesh(2, 4)
  model = gear.GEAR(num_items=num_items, num_behaviors=4, d_model=16, n_head=2,
                         n_layer=1, dropout=0.1,
                         table_rows=parallel.table_rows(num_items, mesh, True))
  tx = steps.make_optimizer(1e-3, 1e-6)
  state = steps.create_state(model, tx, mesh, seed=0, max_len=9, shard_items=True)
  batch = {k: np.ones((16, 9), np.int32) for k in ('items', 'behaviors', 'gaps')}
  batch['mask'] = np.ones(16, bool)
  out = {}
  for budget in (64.0, 0.05):  # one token chunk; many tiny ones (vocab chunks unsharded)
    step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, alpha=0.1,
                                                 loss_impl='auto', loss_memory_mb=budget,
                                                 vocab_shards=4))
    hlo = step.lower(state, parallel.put_batch(batch, mesh)).compile().as_text()
    out[str(budget)] = re.findall(r'= (\S+) all-gather(?:-start)?\(', hlo)
  return out


def checkpoint(workdir: str, data_path: str, cache: str) -> dict:
  """Trains on an 8x1 mesh, then evaluates the best checkpoint on other meshes."""
  from gear_jax import defaults, evaluator, trainer
  config = defaults.load_config('configs/test.py', {'data.path': data_path,
                                                    'data.cache_dir': cache})
  config.train.num_epochs = 2
  config.mesh.data, config.mesh.model = 8, 1
  summary = trainer.train_and_evaluate(config, workdir)
  out = {'summary': summary['best_val']}
  for name, (data, model_axis, shard_items) in MESHES.items():
    config.mesh.data, config.mesh.model, config.mesh.shard_items = data, model_axis, shard_items
    out[name] = evaluator.evaluate_run(config, workdir, checkpoint='best')['metrics']
  return out


if __name__ == '__main__':
  what = sys.argv[1]
  if what == 'steps':
    # 40 table rows divide every mesh here; a padded table (151 rows on a 4x2 mesh)
    # is covered end to end through the CLI by tests/test_options.py
    result = {'even': train_steps(39), 'all_gathers': collectives()}
  else:
    result = checkpoint(*sys.argv[2:5])
  print(json.dumps(result))
