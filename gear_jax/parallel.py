"""Devices, meshes and hosts: one code path from one CPU to many GPUs on many hosts.

A `jax.sharding.Mesh` with axes ('data', 'model'):
- the batch is sharded over 'data' (each process feeds its own slice; global arrays are
  assembled with `jax.make_array_from_process_local_data`);
- parameters are replicated, except that with ``config.mesh.shard_items`` the item
  embedding table (which is also the tied item head) is sharded by rows over 'model'.
  The chunked loss then works on row shards of the logits: XLA's SPMD partitioner turns
  the log-sum-exp and the label gather into reductions over 'model', so the full
  [tokens, V] logits are never gathered on one device.
Everything else is ordinary `jax.jit` with shardings: no hand-written communication.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gear_jax.errors import ConfigError

DATA, MODEL = 'data', 'model'


def initialize_distributed(coordinator: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts JAX's distributed runtime when running on several processes.

  Explicit settings win; otherwise ``jax.distributed.initialize()`` detects SLURM,
  Open MPI and TPU pods itself, and `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID` are read from the environment. A single plain process does
  nothing."""
  if jax.distributed.is_initialized():
    return
  env = os.environ
  coordinator = coordinator or env.get('JAX_COORDINATOR_ADDRESS', '')
  num_processes = num_processes or int(env.get('JAX_NUM_PROCESSES', '0') or 0)
  if process_id < 0:
    process_id = int(env.get('JAX_PROCESS_ID', '-1') or -1)
  in_slurm = int(env.get('SLURM_NTASKS', '1') or 1) > 1
  if (coordinator and num_processes > 1) or in_slurm:
    # cross-process collectives between CPU devices (tests, CPU clusters); GPUs use NCCL
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator and num_processes > 1:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes,
                               process_id=process_id if process_id >= 0 else None)
  elif in_slurm:
    jax.distributed.initialize()


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all devices of all processes);
  data=-1 takes what model leaves."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ConfigError(f'mesh.model={model} does not divide the {n} devices',
                      field='config.mesh.model')
  if data == -1:
    data = n // model
  if data * model < n and jax.process_count() == 1:
    devices = devices[:data * model]  # a single process may use fewer devices
  elif data * model != n:
    raise ConfigError(f'mesh.data={data} x mesh.model={model} != {n} devices',
                      field='config.mesh.data', hint='use mesh.data=-1 to take all '
                      'devices')
  return jax.make_mesh((data, model), (DATA, MODEL), devices=devices,
                       axis_types=(AxisType.Auto, AxisType.Auto))


def state_shardings(tree, mesh: Mesh, shard_items: bool):
  """Shardings of parameters or of any state that mirrors them (Adam moments,
  accumulated gradients): replicated, except with `shard_items` every item table
  (a 2-D leaf at .../item_emb/embedding) by rows over 'model'. Pinning the optimizer
  state to the same rule keeps the compiled train step's input and output shardings
  identical, step after step."""
  def spec(path, x):
    if shard_items and _is_table(path) and len(x.shape) == 2:
      return NamedSharding(mesh, P(MODEL, None))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(spec, tree)


# -- the item table sharded over 'model' ---------------------------------------------
# A row-sharded array needs a row count divisible by the 'model' axis, and the table
# has num_items + 1 rows. The training state then holds a table padded with zero rows
# (`table_rows`, `GEAR.table_rows`), cut back before every softmax and ranking;
# checkpoints always hold the real [num_items + 1, d] table (and Adam moments), so a
# checkpoint restores on any mesh. Conversions touch only leaves whose path ends in
# item_emb/embedding (the parameter and its optimizer-state mirrors).

def table_rows(num_items: int, mesh: Mesh, shard_items: bool) -> int:
  """Rows of the item table in the training state (0: the real num_items + 1)."""
  rows, model = num_items + 1, mesh.shape[MODEL]
  padded = -(-rows // model) * model
  return padded if shard_items and padded != rows else 0


def _is_table(path) -> bool:
  keys = [getattr(p, 'key', None) for p in path]
  return keys[-2:] == ['item_emb', 'embedding']


def _canonical_sharding(mesh: Mesh, d: int) -> NamedSharding:
  # by columns where they divide (memory stays spread), else replicated
  return NamedSharding(mesh, P(None, MODEL) if d % mesh.shape[MODEL] == 0 else P())


def canonical_target(target, num_items: int, mesh: Mesh):
  """Restore targets of the checkpoint form of `target` (abstract state leaves)."""
  def leaf(path, x):
    if _is_table(path) and x.shape[0] != num_items + 1:
      return jax.ShapeDtypeStruct((num_items + 1,) + x.shape[1:], x.dtype,
                                  sharding=_canonical_sharding(mesh, x.shape[1]))
    return x
  return jax.tree_util.tree_map_with_path(leaf, target)


def to_canonical(tree, num_items: int, mesh: Mesh):
  """The checkpoint form of state leaves: padded item tables cut to num_items + 1."""
  def leaf(path, x):
    if _is_table(path) and x.shape[0] != num_items + 1:
      return jax.jit(lambda t: t[:num_items + 1],
                     out_shardings=_canonical_sharding(mesh, x.shape[1]))(x)
    return x
  return jax.tree_util.tree_map_with_path(leaf, tree)


def from_canonical(tree, target):
  """Restored checkpoint leaves -> the training state's shapes and shardings."""
  def leaf(path, x, t):
    if _is_table(path) and x.shape != t.shape:
      pad = ((0, t.shape[0] - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)
      return jax.jit(lambda a: jnp.pad(a, pad), out_shardings=t.sharding)(x)
    return x
  return jax.tree_util.tree_map_with_path(leaf, tree, target)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def process_slice() -> tuple[int, int]:
  """(index, count) of this process, for sharding the input pipelines."""
  return jax.process_index(), jax.process_count()


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def abstract_batch(example: dict[str, np.ndarray], mesh: Mesh,
                   process_count: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes/dtypes/shardings of batches like `example` (this process's rows)."""
  sharding = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((v.shape[0] * process_count,) + v.shape[1:], v.dtype,
                                  sharding=sharding) for k, v in example.items()}


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  data = mesh.shape[DATA]
  if batch_size % data or batch_size % jax.process_count():
    raise ConfigError(f'{batch_size} must be divisible by the data axis ({data} '
                      f'devices) and the process count ({jax.process_count()})',
                      field=f'config.{what}')


def to_host(x) -> np.ndarray:
  """An array as numpy on every process (replicated values are read locally)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)



def sync_processes(name: str) -> None:
  """A barrier across processes (nothing to do in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
