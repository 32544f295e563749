"""GEAR preprocessing (behavior selection, min_uc, time gaps, dense ids, leave-one-out)
with an on-disk cache.

The steps follow the data protocol of ``docs/model.md``, in order:
1. multi-behavior mode keeps every behavior; single-behavior mode only the target;
2. users with fewer than ``min_uc`` interactions are dropped;
3. ``gap`` = timestamp minus the user's previous timestamp (0 for the first);
4. users, items and behaviors get dense ids 1..N (0 is padding). Users and items are
   numbered in sorted order of their raw ids, behaviors in configured order, so the
   same file always gives the same ids;
5. the split. ``val`` (the reference protocol): a user whose last interaction has the
   target behavior gives it to validation and trains on the rest; every other user
   trains on everything. ``val_test`` (beyond the reference): a user whose last
   interaction has the target behavior gives it to TEST, whose input is the user's
   whole earlier history. If that history holds an earlier target interaction with at
   least one interaction before it, the last such one is the user's VALIDATION case,
   and the user trains only on the interactions before it (nothing at or after the
   validation case is ever trained on). Other test users train on the whole earlier
   history; users without a test case train on everything.

Interactions are kept per user in one flat array (CSR layout, users in id order,
time order inside a user); held-out cases are positions in it, so evaluation input
(the history before a case) is a slice and nothing is copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zipfile

import numpy as np

from gear_jax import atomic
from gear_jax.data import readers
from gear_jax.data.errors import DataError

CACHE_VERSION = 1
SPLITS = ('val', 'val_test')


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that changes the preprocessed result (the cache key has all of it)."""
  behaviors: tuple[str, ...] = ('pv', 'fav', 'cart', 'buy')
  target: str = 'buy'
  multi_behavior: bool = True
  min_uc: int = 3
  split: str = 'val'

  def validate(self) -> None:
    if len(set(self.behaviors)) != len(self.behaviors) or not self.behaviors:
      raise DataError(f'data.behaviors must be distinct names, got {self.behaviors}',
                      field='data.behaviors')
    if self.target not in self.behaviors:
      raise DataError(f'target behavior {self.target!r} is not in data.behaviors '
                      f'{list(self.behaviors)}', field='data.target')
    if self.split not in SPLITS:
      raise DataError(f'unknown split {self.split!r}; use one of {SPLITS}',
                      field='data.split')
    if self.min_uc < 1:
      raise DataError(f'min_uc must be >= 1, got {self.min_uc}', field='data.min_uc')


@dataclasses.dataclass
class GearData:
  """A preprocessed data set. Users are 0-based row indices here (dense id - 1).

  Attributes:
    behaviors: names of behavior ids 1..n_b (kept behaviors, configured order).
    target: dense id of the target behavior.
    offsets: [U + 1] int64, user u's interactions are rows offsets[u]:offsets[u+1].
    items, behavior, gaps: [N] int32/int8/int32, dense item id, behavior id, seconds
      since the user's previous interaction (0 for the first).
    train_len: [U] int32, the first train_len[u] interactions of u are training data.
    val_user, val_pos: [Nv] validation cases (user row, flat position of the held-out
      interaction); test_user, test_pos likewise (empty in the ``val`` split).
    user_ids, item_ids: raw ids of dense ids 1..U / 1..V (index id - 1).
    behavior_counts: raw behavior name -> count after filtering.
  """
  behaviors: tuple[str, ...]
  target: int
  offsets: np.ndarray
  items: np.ndarray
  behavior: np.ndarray
  gaps: np.ndarray
  train_len: np.ndarray
  val_user: np.ndarray
  val_pos: np.ndarray
  test_user: np.ndarray
  test_pos: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray
  behavior_counts: dict[str, int]
  split: str
  key: str = ''

  @property
  def num_users(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @property
  def num_behaviors(self) -> int:
    return len(self.behaviors)

  @property
  def num_interactions(self) -> int:
    return len(self.items)

  @property
  def seq_len(self) -> np.ndarray:
    return np.diff(self.offsets)

  def eval_cases(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(user rows, flat positions) of the held-out cases of ``val`` or ``test``."""
    if split == 'val':
      return self.val_user, self.val_pos
    if split == 'test':
      if self.split != 'val_test':
        raise DataError("there is no test split: set data.split='val_test'",
                        field='data.split')
      return self.test_user, self.test_pos
    raise ValueError(f'unknown evaluation split {split!r}')

  def touched_keys(self) -> np.ndarray:
    """Sorted unique user * (V + 1) + item over every interaction (all splits)."""
    user = np.repeat(np.arange(self.num_users, dtype=np.int64), self.seq_len)
    keys = np.sort(user * (self.num_items + 1) + self.items)
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first]  # np.unique's hash path is ~10x slower here

  def train_positions(self) -> np.ndarray:
    """Flat positions of every training interaction (user order, time order)."""
    in_train = np.arange(self.num_interactions) < np.repeat(
        self.offsets[:-1] + self.train_len, self.seq_len)
    return np.flatnonzero(in_train)

  def train_items(self) -> np.ndarray:
    """Items of every training interaction (flat, user order)."""
    return self.items[self.train_positions()]

  # -- cache (de)serialisation -------------------------------------------------------
  _ARRAYS = ('offsets', 'items', 'behavior', 'gaps', 'train_len', 'val_user', 'val_pos',
             'test_user', 'test_pos', 'user_ids', 'item_ids')

  def to_arrays(self) -> dict[str, np.ndarray]:
    meta = dict(behaviors=list(self.behaviors), target=self.target, split=self.split,
                behavior_counts=self.behavior_counts, key=self.key)
    out = {k: getattr(self, k) for k in self._ARRAYS}
    out['meta_json'] = np.array(json.dumps(meta))
    return out

  @classmethod
  def from_arrays(cls, arrays) -> 'GearData':
    meta = json.loads(str(arrays['meta_json']))
    data = cls(behaviors=tuple(meta['behaviors']), target=meta['target'],
               behavior_counts=meta['behavior_counts'], split=meta['split'],
               key=meta['key'], **{k: arrays[k] for k in cls._ARRAYS})
    data.check()
    return data

  def check(self) -> None:
    """Internal consistency (a cache that fails it is rebuilt, not trusted)."""
    n, u = self.num_interactions, self.num_users
    ok = (self.offsets[0] == 0 and self.offsets[-1] == n
          and len(self.behavior) == n and len(self.gaps) == n
          and len(self.train_len) == u and len(self.user_ids) == u
          and len(self.val_user) == len(self.val_pos)
          and len(self.test_user) == len(self.test_pos)
          and (n == 0 or (self.items.min() >= 1 and self.items.max() <= self.num_items))
          and np.all(self.train_len <= self.seq_len))
    if not ok:
      raise ValueError('inconsistent preprocessed arrays')


def fingerprint(path: str) -> str:
  """Content hash of a file (blake2b): the cache key survives copies and touches."""
  h = hashlib.blake2b(digest_size=16)
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(8 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def preprocess(raw: readers.RawInteractions, settings: Settings) -> GearData:
  """Applies the data protocol (``docs/model.md``; steps 1-5 of this module's
  docstring) to parsed columns."""
  settings.validate()
  path = raw.path
  target_code = raw.behaviors.index(settings.target) + 1
  beh = raw.behavior
  n_target = int(np.count_nonzero(beh == target_code))
  if n_target == 0:
    raise DataError(f'the target behavior {settings.target!r} never occurs',
                    path=path, field='behavior',
                    hint='check data.target (e.g. pos for yelp) and data.behaviors')
  # 1. behavior selection
  keep = None if settings.multi_behavior else beh == target_code
  user, item, ts = raw.user, raw.item, raw.timestamp
  if keep is not None:
    user, item, beh, ts = user[keep], item[keep], beh[keep], ts[keep]
  kept_behaviors = [i + 1 for i in range(len(raw.behaviors))
                    if settings.multi_behavior or i + 1 == target_code]
  # dense user codes (sorted raw ids); then a stable sort by (user, time)
  user_uniq, user_code = np.unique(user, return_inverse=True)
  user_code = user_code.reshape(-1)
  if not _is_sorted_pairs(user_code, ts):
    order = np.lexsort((ts, user_code))
    user_code, item, beh, ts = user_code[order], item[order], beh[order], ts[order]
  # 2. min_uc
  user_uniq, counts, user_code, item, beh, ts = _drop_short_users(
      user_uniq, user_code, item, beh, ts, settings.min_uc, path)
  offsets = np.zeros(len(counts) + 1, np.int64)
  np.cumsum(counts, out=offsets[1:])
  # 3. time gaps inside each user
  gaps = _time_gaps(ts, offsets, path)
  # 4. dense items and behaviors
  item_uniq, item_code = np.unique(item, return_inverse=True)
  beh, target, names, behavior_counts = _dense_behaviors(beh, raw.behaviors,
                                                         kept_behaviors, target_code)
  # 5. split
  train_len, val_user, val_pos, test_user, test_pos = _split(
      beh, target, offsets, counts, settings.split)
  return GearData(
      behaviors=names, target=target, offsets=offsets,
      items=(item_code.reshape(-1) + 1).astype(np.int32), behavior=beh,
      gaps=gaps.astype(np.int32), train_len=train_len,
      val_user=val_user.astype(np.int64), val_pos=val_pos.astype(np.int64),
      test_user=test_user.astype(np.int64), test_pos=test_pos.astype(np.int64),
      user_ids=user_uniq, item_ids=item_uniq, behavior_counts=behavior_counts,
      split=settings.split)


def _drop_short_users(user_uniq, user_code, item, beh, ts, min_uc: int, path: str):
  """Step 2: drops users with fewer than `min_uc` interactions and renumbers the rest.

  Returns (user_uniq, counts per user, user_code, item, beh, ts), the rows of
  dropped users removed (the arrays as they are when no user is dropped)."""
  counts = np.bincount(user_code, minlength=len(user_uniq))
  keep_user = counts >= min_uc
  if not keep_user.any():
    raise DataError(f'no user has at least min_uc={min_uc} interactions',
                    path=path, field='data.min_uc')
  if not keep_user.all():
    rows = keep_user[user_code]
    new_code = np.cumsum(keep_user) - 1
    user_code, item, beh, ts = new_code[user_code[rows]], item[rows], beh[rows], ts[rows]
    user_uniq, counts = user_uniq[keep_user], counts[keep_user]
  return user_uniq, counts, user_code, item, beh, ts


def _time_gaps(ts: np.ndarray, offsets: np.ndarray, path: str) -> np.ndarray:
  """Step 3: int64 seconds since the user's previous interaction (0 for the first)."""
  gaps = np.zeros(len(ts), np.int64)
  gaps[1:] = np.diff(ts)
  gaps[offsets[:-1]] = 0
  if gaps.max(initial=0) >= 2**31:
    raise DataError('a time gap exceeds 2**31 seconds (68 years)', path=path,
                    field='timestamp', hint='are timestamps in milliseconds? set '
                    'data.csv.timestamp_unit=ms')
  return gaps


def _dense_behaviors(beh: np.ndarray, behaviors: tuple[str, ...],
                     kept_behaviors: list[int], target_code: int):
  """Step 4 for behaviors: the kept ones get ids 1..n in configured order.

  Returns (dense behavior per row, dense target id, kept names, name -> count)."""
  beh_map = np.zeros(len(behaviors) + 1, np.int8)
  beh_map[kept_behaviors] = np.arange(1, len(kept_behaviors) + 1)
  beh = beh_map[beh]
  target = int(beh_map[target_code])
  names = tuple(behaviors[c - 1] for c in kept_behaviors)
  behavior_counts = {name: int(c) for name, c in
                     zip(names, np.bincount(beh, minlength=len(names) + 1)[1:])}
  return beh, target, names, behavior_counts


def _split(beh: np.ndarray, target: int, offsets: np.ndarray, counts: np.ndarray,
           split: str):
  """Step 5: (train_len, val_user, val_pos, test_user, test_pos) of the split ``val``
  or ``val_test`` (see the module docstring)."""
  last = offsets[1:] - 1
  is_last_target = beh[last] == target
  train_len = counts.astype(np.int32)
  empty = np.zeros(0, np.int64)
  if split == 'val':
    val_user = np.flatnonzero(is_last_target)
    val_pos = last[val_user]
    train_len[val_user] -= 1
    test_user, test_pos = empty, empty
  else:
    test_user = np.flatnonzero(is_last_target)
    test_pos = last[test_user]
    train_len[test_user] -= 1
    # the last earlier target interaction with at least one interaction before it
    tgt = np.flatnonzero(beh == target)
    k = np.searchsorted(tgt, test_pos) - 1
    prev = np.where(k >= 0, tgt[np.maximum(k, 0)], -1)
    has_val = prev > offsets[test_user]
    val_user = test_user[has_val]
    val_pos = prev[has_val]
    train_len[val_user] = (val_pos - offsets[val_user]).astype(np.int32)
  return train_len, val_user, val_pos, test_user, test_pos


def _is_sorted_pairs(user: np.ndarray, ts: np.ndarray) -> bool:
  """Whether rows are already ordered by (user, time): the usual case, no sort."""
  if len(user) < 2:
    return True
  du = np.diff(user)
  return bool(np.all((du > 0) | ((du == 0) & (np.diff(ts) >= 0))))


# -- cache --------------------------------------------------------------------------

def default_cache_dir() -> str:
  return os.environ.get('GEAR_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'gear_jax')


def cache_key(file_hash: str, fmt: readers.FileFormat, settings: Settings) -> str:
  spec = dict(version=CACHE_VERSION, file=file_hash, format=fmt.describe(),
              settings=dataclasses.asdict(settings))
  return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(),
                         digest_size=12).hexdigest()


def atomic_save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes an .npz atomically: a crash never leaves a half-written cache."""
  with atomic.atomic_write(path) as f:
    np.savez(f, **arrays)


def load_npz(path: str) -> dict[str, np.ndarray] | None:
  """All arrays of a cache file, or None when it is missing or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
    logging.warning('ignoring unreadable cache %s (%s); rebuilding', path, e)
    return None


@dataclasses.dataclass
class LoadInfo:
  """How a data set was obtained (for logs and the stats CLI)."""
  from_cache: bool
  seconds: float
  parse_seconds: float = 0.0
  cache_path: str = ''


def load(path: str, fmt: readers.FileFormat, settings: Settings,
         cache_dir: str | None = None) -> tuple[GearData, LoadInfo]:
  """Reads and preprocesses `path`, or loads the cached result.

  The cache file is keyed by the content hash of `path`, the format and every
  setting; an unreadable or inconsistent cache file is rebuilt (and replaced
  atomically), never trusted. ``cache_dir=''`` disables the cache.
  """
  start = time.perf_counter()
  settings.validate()
  if not os.path.isfile(path):
    readers.read_interactions(path, fmt, settings.behaviors)  # raises a DataError
  use_cache = cache_dir != ''
  key = cache_key(fingerprint(path), fmt, settings)
  cache_path = ''
  if use_cache:
    cache_path = os.path.join(cache_dir or default_cache_dir(), f'data-{key}.npz')
    arrays = load_npz(cache_path)
    if arrays is not None:
      try:
        data = GearData.from_arrays(arrays)
        if data.key == key:
          return data, LoadInfo(True, time.perf_counter() - start, 0.0, cache_path)
        logging.warning('cache %s has another key; rebuilding', cache_path)
      except (KeyError, ValueError, TypeError) as e:
        logging.warning('ignoring corrupt cache %s (%s); rebuilding', cache_path, e)
  raw = readers.read_interactions(path, fmt, settings.behaviors)
  parse_s = time.perf_counter() - start
  data = preprocess(raw, settings)
  data.key = key
  if use_cache:
    atomic_save_npz(cache_path, data.to_arrays())
  return data, LoadInfo(False, time.perf_counter() - start, parse_s, cache_path)


def summary(data: GearData) -> dict:
  """The figures the stats CLI reports (all counted after filtering)."""
  lengths = data.seq_len
  out = dict(num_users=data.num_users, num_items=data.num_items,
             num_interactions=data.num_interactions,
             num_val_users=int(len(data.val_user)))
  if data.split == 'val_test':
    out['num_test_users'] = int(len(data.test_user))
  out['behavior_counts'] = dict(data.behavior_counts)
  out['num_train_interactions'] = int(data.train_len.sum())
  out['seq_len'] = dict(
      min=int(lengths.min()), mean=round(float(lengths.mean()), 2),
      median=float(np.median(lengths)), p90=float(np.percentile(lengths, 90)),
      p99=float(np.percentile(lengths, 99)), max=int(lengths.max()))
  out['density'] = data.num_interactions / float(data.num_users * data.num_items)
  return out


def settings_from_config(data_config) -> Settings:
  """Settings from ``config.data`` (the ml_collections section)."""
  return Settings(behaviors=tuple(data_config.behaviors), target=data_config.target,
                  multi_behavior=bool(data_config.multi_behavior),
                  min_uc=int(data_config.min_uc), split=data_config.split)


def format_from_config(data_config) -> readers.FileFormat:
  """The file format selected by ``config.data.format`` (and ``config.data.csv``)."""
  name = data_config.format
  if name == 'tsv':
    return readers.TSV
  if name == 'taobao':
    return readers.TAOBAO
  if name == 'csv':
    csv = data_config.csv
    unit = csv.timestamp_unit
    if unit not in ('s', 'ms'):
      raise DataError(f"timestamp_unit must be 's' or 'ms', got {unit!r}",
                      field='data.csv.timestamp_unit')
    columns = {role: _column(csv.columns[role]) for role in readers.ROLES}
    return readers.FileFormat(
        delimiter=csv.delimiter, header=bool(csv.header), columns=columns,
        behavior_map=readers.parse_behavior_map(csv.behavior_map),
        timestamp_divisor=1000 if unit == 'ms' else 1)
  raise DataError(f"unknown data.format {name!r}; use 'tsv', 'taobao' or 'csv'",
                  field='data.format')


def _column(spec: int | str) -> int | str:
  return int(spec) if isinstance(spec, int) or str(spec).isdigit() else str(spec)

