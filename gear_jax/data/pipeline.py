"""grain input pipelines: training sequences and evaluation cases.

A grain record here is a whole batch: record ``i`` of the training pipeline is global
batch ``i`` (epoch ``i // batches_per_epoch``), built with vectorised numpy from the
flat per-user arrays. Per-record grain machinery costs ~25 us a record, which would cap
the pipeline near 40k sequences/s; whole-batch records reach millions.

Every batch has a fixed shape (the last, partial batch of an epoch is padded with
all-zero rows and ``mask`` False), so the compiled step never sees a new shape.

Training batch (``B`` = batch size per process, ``L`` = max_len):
  items [B, L] int32      the window's items, left-padded with 0 (labels of the item
                          head; the model consumes the first L - 1)
  behaviors [B, L] int32  the window's behaviors, left-padded with 0
  gaps [B, L] int32       seconds since the previous interaction, 0 on padding and on
                          the window's first interaction; the model builds the L x L
                          time matrix from these on device
  mask [B] bool           real rows
Evaluation batch: the same three sequences ending at the held-out interaction (its
item replaced by 0, which the model never reads), plus
  target [B] int32        the held-out item
  candidates [B, 1 + n]   the held-out item then its n negatives (sampled protocol)
  case [B] int32          index of the case in the split (-1 on padding rows)

The random window rule: a user with more than L training interactions uses the last
L, except with probability 0.2 a uniformly random window of length L. The choice comes
from a counter-based hash of (seed, epoch, user), so it does not depend on batching,
prefetching, process count or restarts.
"""

from __future__ import annotations

import dataclasses
import threading

import grain
import numpy as np

from gear_jax.data.preprocess import GearData

RANDOM_WINDOW_PROB = 0.2


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, epoch: int, ids: np.ndarray, stream: int) -> np.ndarray:
  """Uniform [0, 1) floats, one per id, a pure function of (seed, epoch, id, stream)."""
  with np.errstate(over='ignore'):
    base = _mix64(np.array([seed, epoch, stream], np.uint64)
                  * np.array([0x9E3779B97F4A7C15, 0xD1B54A32D192ED03,
                              0x8CB92BA72F3D8DD7], np.uint64))
    x = _mix64(ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
               + (base[0] ^ base[1] ^ base[2]))
  return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _windows(data: GearData, users: np.ndarray, ends: np.ndarray, lengths: np.ndarray,
             max_len: int) -> dict[str, np.ndarray]:
  """Left-padded windows of the `lengths` interactions ending before flat `ends`."""
  cols = np.arange(max_len)
  pos = ends[:, None] - max_len + cols  # [n, L] flat positions
  valid = cols >= (max_len - np.minimum(lengths, max_len))[:, None]
  pos = np.where(valid, pos, 0)
  items = np.where(valid, data.items[pos], 0).astype(np.int32)
  behaviors = np.where(valid, data.behavior[pos], 0).astype(np.int32)
  gaps = np.where(valid, data.gaps[pos], 0).astype(np.int32)
  # the window's first gap points outside the window; T never uses it
  first = max_len - np.minimum(lengths, max_len)
  gaps[np.arange(len(users)), np.minimum(first, max_len - 1)] = 0
  return dict(items=items, behaviors=behaviors, gaps=gaps)


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads every array to `rows` rows with zeros (and `case` with -1)."""
  n = len(batch['mask'])
  if n == rows:
    return batch
  out = {}
  for k, v in batch.items():
    pad = np.full((rows - n,) + v.shape[1:], -1 if k == 'case' else 0, v.dtype)
    out[k] = np.concatenate([v, pad])
  return out


@dataclasses.dataclass
class TrainBatches:
  """Maps a global batch index to this process's part of that training batch."""
  data: GearData
  batch_size: int  # global batch size
  max_len: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(f'batch size {self.batch_size} is not divisible by the '
                       f'process count {self.process_count}')
    # users with at least one training interaction (every user when min_uc >= 2)
    self.users = np.flatnonzero(self.data.train_len > 0)
    self.batches_per_epoch = -(-len(self.users) // self.batch_size)
    self._perm: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perm.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.users)
        self._perm = {epoch: perm}  # keep one epoch: the pipeline moves forward
      return perm

  def __call__(self, index: int, _=None) -> dict[str, np.ndarray]:
    epoch, b = divmod(int(index), self.batches_per_epoch)
    per_process = self.batch_size // self.process_count
    lo = b * self.batch_size + self.process_index * per_process
    users = self.permutation(epoch)[lo:lo + per_process]
    n = self.data.train_len[users].astype(np.int64)
    long = n > self.max_len
    pick = hash_uniform(self.seed, epoch, users, 0) < RANDOM_WINDOW_PROB
    start = np.floor(hash_uniform(self.seed, epoch, users, 1)
                     * (n - self.max_len + 1)).astype(np.int64)
    end = np.where(long & pick, start + self.max_len, n)  # exclusive, within the user
    batch = _windows(self.data, users, self.data.offsets[users] + end,
                     np.minimum(n, self.max_len), self.max_len)
    batch['mask'] = np.ones(len(users), bool)
    return _pad_rows(batch, per_process)


@dataclasses.dataclass
class EvalBatches:
  """Maps a batch index to evaluation cases (users in order) of one split."""
  data: GearData
  split: str
  batch_size: int  # global batch size
  max_len: int
  negatives: np.ndarray | None = None  # [cases, n] or None for full ranking
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    self.users, self.pos = self.data.eval_cases(self.split)
    self.num_batches = -(-len(self.users) // self.batch_size)
    if self.negatives is not None and len(self.negatives) != len(self.users):
      raise ValueError('negatives do not match the evaluation cases')

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    per_process = self.batch_size // self.process_count
    lo = int(index) * self.batch_size + self.process_index * per_process
    case = np.arange(lo, min(lo + per_process, len(self.users)))
    users, pos = self.users[case], self.pos[case]
    lengths = pos - self.data.offsets[users] + 1
    batch = _windows(self.data, users, pos + 1, lengths, self.max_len)
    target = self.data.items[pos].astype(np.int32)
    batch['items'][:, -1] = 0  # the held-out item is never shown to the model
    batch['target'] = target
    if self.negatives is not None:
      batch['candidates'] = np.concatenate(
          [target[:, None], self.negatives[case]], axis=1).astype(np.int32)
    batch['case'] = case.astype(np.int32)
    batch['mask'] = np.ones(len(case), bool)
    return _pad_rows(batch, per_process)


def train_pipeline(batches: TrainBatches, *, num_threads: int = 2,
                   prefetch: int = 8) -> grain.IterDataset:
  """An endless, checkpointable grain iterator source over training batches.

  `iter(...)` gives an iterator whose ``get_state()`` / ``set_state()`` hold the next
  global batch index: a restored run sees exactly the same batches."""
  ds = grain.MapDataset.range(batches.batches_per_epoch).repeat(None)
  ds = ds.map_with_index(batches)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))


def eval_pipeline(batches: EvalBatches, *, num_threads: int = 2,
                  prefetch: int = 8) -> grain.IterDataset:
  """One pass over the evaluation cases, in order."""
  ds = grain.MapDataset.range(batches.num_batches).map(batches)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))
