"""Serving GEAR without the model code: load an artifact made by `gear_jax.export`.

  from gear_jax import serving
  model = serving.load('model.jaxexport')       # + model.jaxexport.vocab.json beside it
  items, scores = model.recommend_history(['1021', '88'], ['pv', 'cart'],
                                          [1700000000, 1700000300], k=10)

The artifact is the scoring function serialised with `jax.export` (StableHLO, for CPU and
CUDA, the parameters baked in, any batch size); the sidecar JSON holds the raw item and
user ids, the behavior names and the settings the inputs are built with. Loading needs
jax and numpy only: this module imports nothing else from gear_jax (and never flax), so
a service may also copy this one file.

It also holds the request side shared with the in-process `gear_jax.recommend` (raw ids
-> dense ids, histories -> the model's input windows, exclusion lists, batching), so the
artifact and the Python model see identical inputs:
- a history is a user's interactions in time order (equal times keep their given order);
  the model reads its last L - 1 interactions, then scores the slot after them as the
  target behavior (the next buy), exactly as evaluation scores a held-out buy;
- that slot's time gap is `at` minus the last interaction's time (seconds), 0 without
  `at` (the next action right after the last one). Interactions later than `at` are
  left out: `at` is "as of" this time;
- items the model does not know are left out of the input (and counted); a user with
  no known item left is not scored;
- ranking covers the whole catalogue, exactly; equal scores go to the lower item id
  (dense ids are in sorted order of the raw ids).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

FORMAT = 'gear_jax.serving/1'
EXCLUDE = ('none', 'seen', 'target')
SIDECAR_SUFFIX = '.vocab.json'
# Users per scoring step, two steps in flight (`HistoryRecommender.iter_batches`): at
# 99,037 items on 2 CPU cores 128 x 2 is as fast as 256 x 2 and its peak RSS stayed at
# 0.65-0.91 GB in 7 runs (256 x 2: 0.72-1.27 GB in 13).
BATCH_SIZE = 128
# Batch shapes a request of n users is scored on: the smallest that holds n (up to the
# largest, `batch_size`), so one shopper costs one row, not 128; each shape is compiled
# once. Powers of two: at 99,037 items a call of 2, 4, 8 and 16 rows took 1.8, 2.6, 3.8
# and 6.7 ms on 2 cores, so padding 3 rows to 8 instead of 4 would cost ~50 % more
# (docs/serving.md, cost per bucket).
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_WIDTH = 8  # the narrowest exclusion width (a power of two, see `exclusion_width`)
_MAX_GAP = 2**31 - 1  # gaps are int32 seconds in the model


def sidecar_path(artifact: str) -> str:
  return os.fspath(artifact) + SIDECAR_SUFFIX


def digest(data: bytes) -> str:
  """The content hash that ties a sidecar to its artifact."""
  return hashlib.blake2b(data, digest_size=16).hexdigest()


# -- raw ids ------------------------------------------------------------------------------

def as_ids(values) -> np.ndarray:
  """Raw ids as the readers hold them: int64 for numbers, byte strings for text.

  Text is compared as text: '007' is not 7, and '12' equals 12 only through its text."""
  a = np.asarray(values)
  if a.size == 0:
    return np.zeros(a.shape, np.int64)
  if a.dtype.kind in 'iu':
    return a.astype(np.int64)
  if a.dtype.kind == 'S':
    return a
  if a.dtype.kind == 'U':
    return np.char.encode(a, 'utf-8')
  if a.dtype.kind == 'O':
    text = [v if isinstance(v, bytes) else str(v).encode() for v in a.reshape(-1)]
    return np.array(text, dtype=bytes).reshape(a.shape)
  raise TypeError(f'ids must be integers or strings, got an array of {a.dtype}')


def readable(ids: np.ndarray) -> np.ndarray:
  """Raw ids for people: int64 as they are, byte strings decoded to str."""
  return np.char.decode(ids, 'utf-8', 'replace') if ids.dtype.kind == 'S' else ids


def id_text(ids: np.ndarray) -> list[str]:
  """Raw ids as the text they had in the data file."""
  if ids.dtype.kind == 'S':
    return [v.decode('utf-8', 'replace') for v in ids.tolist()]
  return [str(v) for v in ids.tolist()]


class IdIndex:
  """Raw id -> position (1-based; 0 = absent) in a fixed array of distinct raw ids."""

  def __init__(self, ids: np.ndarray):
    self.ids = ids
    self._sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def _keys(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in self._sorted:
      keys = self.ids if self.ids.dtype.kind == kind else self.ids.astype('S20')
      order = np.argsort(keys, kind='stable')
      self._sorted[kind] = keys[order], order
    return self._sorted[kind]

  def __call__(self, raw) -> np.ndarray:
    q = as_ids(raw)
    if len(self.ids) == 0 or q.size == 0:
      return np.zeros(q.shape, np.int64)
    if q.dtype.kind == 'i' and self.ids.dtype.kind == 'S':
      q = q.astype('S20')  # numbers are looked up by their text
    keys, order = self._keys(q.dtype.kind)
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return np.where(keys[pos] == q, order[pos] + 1, 0)


@dataclasses.dataclass
class Vocabulary:
  """What turns raw requests into model inputs: raw item ids of dense ids 1..V (in
  sorted order of the raw ids), behavior names of ids 1..n_b, the target behavior's id
  and the window length L. `users` (raw ids of the training users) is informational."""
  items: np.ndarray
  behaviors: tuple[str, ...]
  target: int
  max_len: int
  users: np.ndarray | None = None

  def __post_init__(self):
    self.item_index = IdIndex(self.items)
    self._raw_table: np.ndarray | None = None
    self._behavior_id = {name: i + 1 for i, name in enumerate(self.behaviors)}
    self._behavior_id.update({i + 1: i + 1 for i in range(len(self.behaviors))})

  @property
  def num_items(self) -> int:
    return len(self.items)

  def behavior_ids(self, names: Sequence) -> np.ndarray:
    """Behavior names (or ids 1..n_b) -> ids; an unknown name is an error."""
    try:  # a dict look-up per interaction: this runs for every request
      return np.array([self._behavior_id[name] for name in names], np.int32)
    except (KeyError, TypeError):
      bad = next(n for n in names if not isinstance(n, (str, int, np.integer))
                 or n not in self._behavior_id)
      raise ValueError(f'unknown behavior {bad!r}; this model knows '
                       f'{list(self.behaviors)}') from None

  def raw_items(self, dense: np.ndarray) -> np.ndarray:
    """Dense ids -> raw ids (int64, or str for text ids); id 0 gives -1 or ''."""
    if self._raw_table is None:  # once: decoding 99,037 text ids takes ~38 ms
      raw = self.items
      if raw.dtype.kind == 'S':
        raw = np.char.decode(raw, 'utf-8', 'replace')
      pad = np.array([-1 if raw.dtype.kind == 'i' else ''], raw.dtype)
      self._raw_table = np.concatenate([pad, raw])
    return self._raw_table[dense]

  def to_json(self) -> dict:
    def plain(ids):
      return None if ids is None else (ids.tolist() if ids.dtype.kind == 'i'
                                       else id_text(ids))
    return dict(items=plain(self.items), users=plain(self.users),
                behaviors=list(self.behaviors), target=self.behaviors[self.target - 1],
                max_len=self.max_len)

  @classmethod
  def from_json(cls, d: dict) -> Vocabulary:
    def ids(values):
      if values is None:
        return None
      if all(isinstance(v, int) for v in values):
        return np.asarray(values, np.int64)
      return as_ids(np.asarray([str(v) for v in values], dtype=object))
    behaviors = tuple(d['behaviors'])
    return cls(items=ids(d['items']), behaviors=behaviors,
               target=behaviors.index(d['target']) + 1, max_len=int(d['max_len']),
               users=ids(d.get('users')))


# -- histories ----------------------------------------------------------------------------

@dataclasses.dataclass
class Histories:
  """Users' interaction histories, one flat array per field (CSR layout): user r holds
  rows offsets[r]:offsets[r + 1], in time order. Items and behaviors are dense ids.

  Attributes:
    users: [n] raw user ids (int64 or bytes), or row numbers for anonymous histories.
    offsets: [n + 1] int64.
    items: [N] int32 dense item ids (unknown items already left out).
    behaviors: [N] int32 behavior ids 1..n_b.
    timestamps: [N] int64 seconds.
    unknown: [n] int64, per user the interactions left out for an unknown item.
  """
  users: np.ndarray
  offsets: np.ndarray
  items: np.ndarray
  behaviors: np.ndarray
  timestamps: np.ndarray
  unknown: np.ndarray

  def __len__(self) -> int:
    return len(self.users)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @classmethod
  def from_columns(cls, users, items, behaviors, timestamps, vocab: Vocabulary
                   ) -> Histories:
    """From one row per interaction in any order: raw user and item ids, behavior ids
    of `vocab` (0 = a behavior the model does not use: left out) and times in seconds.
    Users come out in sorted order of their raw ids; inside a user, rows are ordered by
    time and equal times keep their given order (as in preprocessing)."""
    users = as_ids(users)
    behaviors = np.asarray(behaviors)
    timestamps = np.asarray(timestamps, np.int64)
    keep = behaviors > 0
    uniq, code = np.unique(users[keep], return_inverse=True)
    code = code.reshape(-1)
    dense = vocab.item_index(as_ids(items)[keep]).astype(np.int32)
    ts, beh = timestamps[keep], behaviors[keep].astype(np.int32)
    order = np.lexsort((ts, code))
    code, dense, ts, beh = code[order], dense[order], ts[order], beh[order]
    known = dense > 0
    unknown = np.bincount(code[~known], minlength=len(uniq)).astype(np.int64)
    counts = np.bincount(code[known], minlength=len(uniq))
    offsets = np.zeros(len(uniq) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return cls(users=uniq, offsets=offsets, items=dense[known], behaviors=beh[known],
               timestamps=ts[known], unknown=unknown)

  @classmethod
  def from_lists(cls, items: Sequence[Sequence], behaviors: Sequence[Sequence],
                 timestamps: Sequence[Sequence], vocab: Vocabulary) -> Histories:
    """From one list per user (raw item ids, behavior names, times in seconds); the
    users are numbered 0..n-1 in the given order."""
    if not len(items) == len(behaviors) == len(timestamps):
      raise ValueError('items, behaviors and timestamps need one list per user each')
    lengths = [len(x) for x in items]
    for name, seqs in (('behaviors', behaviors), ('timestamps', timestamps)):
      bad = [i for i, (x, n) in enumerate(zip(seqs, lengths)) if len(x) != n]
      if bad:
        raise ValueError(f'user {bad[0]}: {len(seqs[bad[0]])} {name} for '
                         f'{lengths[bad[0]]} items')
    user = np.repeat(np.arange(len(items), dtype=np.int64), lengths)
    flat = [v for seq in items for v in seq]
    beh = vocab.behavior_ids([v for seq in behaviors for v in seq])
    ts = np.asarray([v for seq in timestamps for v in seq], np.int64).reshape(-1)
    hist = cls.from_columns(user, flat, beh, ts, vocab)
    return hist.reindex(np.arange(len(items)))

  def reindex(self, users: np.ndarray) -> Histories:
    """The histories of raw ids `users` in that order (absent users get empty ones)."""
    rows = IdIndex(self.users)(users) - 1
    return self.take(rows, as_ids(users))

  def take(self, rows: np.ndarray, users: np.ndarray | None = None) -> Histories:
    """Rows `rows` (-1 = an empty history) in that order."""
    rows = np.asarray(rows, np.int64)
    if not len(self):  # e.g. shoppers with no interaction at all
      return Histories(users=np.zeros(len(rows), np.int64) if users is None else users,
                       offsets=np.zeros(len(rows) + 1, np.int64), items=self.items,
                       behaviors=self.behaviors, timestamps=self.timestamps,
                       unknown=np.zeros(len(rows), np.int64))
    if len(rows) == len(self) and (rows == np.arange(len(self))).all():
      return self if users is None else dataclasses.replace(self, users=users)
    ok = rows >= 0
    safe = np.where(ok, rows, 0)
    start = np.where(ok, self.offsets[safe], 0)
    n = np.where(ok, self.offsets[safe + 1] - start, 0)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(n, out=offsets[1:])
    flat = np.repeat(start - offsets[:-1], n) + np.arange(offsets[-1])
    return Histories(users=self.users[safe] if users is None else users, offsets=offsets,
                     items=self.items[flat], behaviors=self.behaviors[flat],
                     timestamps=self.timestamps[flat],
                     unknown=np.where(ok, self.unknown[safe], 0))

  def as_of(self, at) -> tuple[Histories, int]:
    """Each history without its interactions later than `at` (a time, or one per
    user), and how many were left out."""
    at = np.broadcast_to(np.asarray(at, np.int64), (len(self),))
    user = np.repeat(np.arange(len(self)), self.lengths)
    keep = self.timestamps <= at[user]
    if keep.all():
      return self, 0
    counts = np.bincount(user[keep], minlength=len(self))
    offsets = np.zeros(len(self) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Histories(users=self.users, offsets=offsets, items=self.items[keep],
                     behaviors=self.behaviors[keep], timestamps=self.timestamps[keep],
                     unknown=self.unknown), int((~keep).sum())


def model_inputs(hist: Histories, vocab: Vocabulary, at=None) -> dict[str, np.ndarray]:
  """The model's input windows, [n, L] int32 each: the last L - 1 interactions of every
  history (left-padded with 0), then the scored slot (item 0, the target behavior, gap
  `at` - last time, or 0 without `at`). Every history must hold one interaction."""
  big_l = vocab.max_len
  lengths = hist.lengths
  n = len(hist)
  take = np.minimum(lengths, big_l - 1)
  cols = np.arange(big_l - 1)
  first = big_l - 1 - take  # first real column
  valid = cols[None] >= first[:, None]
  pos = np.where(valid, hist.offsets[1:, None] - (big_l - 1) + cols, 0)  # [n, L-1]
  ts = hist.timestamps[pos]
  gaps = np.zeros((n, big_l), np.int64)
  gaps[:, 1:big_l - 1] = ts[:, 1:] - ts[:, :-1]
  last = hist.timestamps[hist.offsets[1:] - 1]
  if at is not None:
    gaps[:, -1] = np.broadcast_to(np.asarray(at, np.int64), (n,)) - last
  gaps[:, :-1] = np.where(valid, gaps[:, :-1], 0)
  gaps[np.arange(n), first] = 0  # the window's first gap points outside it
  out = dict(items=np.zeros((n, big_l), np.int32), behaviors=np.zeros((n, big_l), np.int32),
             gaps=np.clip(gaps, 0, _MAX_GAP).astype(np.int32))
  out['items'][:, :-1] = np.where(valid, hist.items[pos], 0)
  out['behaviors'][:, :-1] = np.where(valid, hist.behaviors[pos], 0)
  out['behaviors'][:, -1] = vocab.target
  return out


def _excluded(hist: Histories, mode: str, target: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user row, item) of every distinct excluded pair, by user, and counts per user."""
  n = len(hist)
  user = np.repeat(np.arange(n, dtype=np.int64), hist.lengths)
  items = hist.items.astype(np.int64)
  if mode == 'target':
    sel = hist.behaviors == target
    user, items = user[sel], items[sel]
  base = int(items.max(initial=0)) + 1
  user, items = np.divmod(np.unique(user * base + items), base)
  return user, items, np.bincount(user, minlength=n)


def exclusion_width(hist: Histories, mode: str, target: int) -> int:
  """The width H that `exclusions` needs for every user of `hist`: a power of two, at
  least 8 (1 for 'none'), so that a compiled scorer is reused across batches."""
  if mode not in EXCLUDE:
    raise ValueError(f'exclude must be one of {EXCLUDE}, got {mode!r}')
  if mode == 'none':
    return 1
  return _width_for(_excluded(hist, mode, target)[2])


def _width_for(counts: np.ndarray) -> int:
  """The smallest power of two (at least 8) that holds the largest count."""
  most = max(int(counts.max(initial=1)), 1)
  return max(8, 1 << (most - 1).bit_length())


def exclusions(hist: Histories, mode: str, target: int, width: int | None = None
               ) -> np.ndarray:
  """Per user, the distinct items not to recommend: [n, H] int32, 0-padded. 'seen':
  every item of the history; 'target': the items of target-behavior interactions (what
  the user already bought); 'none': nothing. H = `width` (default: what `hist` needs,
  see `exclusion_width`)."""
  if mode not in EXCLUDE:
    raise ValueError(f'exclude must be one of {EXCLUDE}, got {mode!r}')
  if mode == 'none':
    return np.zeros((len(hist), width or 1), np.int32)
  user, items, counts = _excluded(hist, mode, target)
  width = width or _width_for(counts)
  out = np.zeros((len(hist), width), np.int32)
  if counts.max(initial=0) > width:
    raise ValueError(f'width {width} < {counts.max()} items to exclude')
  col = np.arange(len(items)) - np.repeat(np.cumsum(counts) - counts, counts)
  out[user, col] = items
  return out


# -- batching concurrent callers ----------------------------------------------------------

def bucket_sizes(largest: int) -> tuple[int, ...]:
  """The batch shapes scored: the `BUCKETS` below `largest`, then `largest`."""
  largest = int(largest)
  if largest < 1:
    raise ValueError(f'the largest batch must be >= 1, got {largest}')
  return tuple(b for b in BUCKETS if b < largest) + (largest,)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
  """The smallest of `buckets` that holds `rows` rows."""
  for b in buckets:
    if b >= rows:
      return b
  raise ValueError(f'{rows} rows exceed the largest batch {buckets[-1]}')


class _Call:
  """One caller's request inside a `Batcher`."""

  __slots__ = ('request', 'rows', 'arrived', 'result', 'error', 'done', 'slot', 'wake',
               'finished')

  def __init__(self, request, rows: int):
    self.request, self.rows, self.arrived = request, rows, time.monotonic()
    self.result = self.error = None
    self.done = self.slot = False  # slot: this caller's thread may score
    self.wake, self.finished = threading.Event(), threading.Event()


class Batcher:
  """Scores the requests of concurrent callers together: `batcher(request, rows)`
  returns `run([requests])`'s answer for this one request.

  There is no scoring thread of its own, so a lone caller is never handed to another
  thread: a caller that finds one of `workers` scoring slots free scores in its own
  thread. Callers that arrive while every slot is busy queue up; when a slot's batch
  is done the oldest queued caller takes the slot over and scores everything queued
  by then (up to `max_rows` rows, oldest first) as one batch, so the queue empties in
  batches as large as the load makes it. With `max_wait_ms` > 0 a caller with a slot
  also waits that long after the oldest request of its batch arrived for more
  requests (while it waits, new callers queue for it). Each caller gets its own
  answer or `run`'s exception. `batches` and `requests` count what was scored."""

  def __init__(self, run: Callable[[list], list], *, max_rows: int,
               max_wait_ms: float = 0.0, workers: int = 1):
    self._run, self.max_rows = run, int(max_rows)
    self.max_wait = max(0.0, float(max_wait_ms)) / 1e3
    self.workers = max(1, int(workers))
    self._cond = threading.Condition(threading.Lock())
    self._queue: collections.deque[_Call] = collections.deque()
    self._slots = 0  # slots held by callers
    self._gathering = 0  # slot holders inside their max_wait window
    self.batches = self.requests = 0

  def __call__(self, request, rows: int = 1):
    call = _Call(request, rows)
    with self._cond:
      self._queue.append(call)
      call.slot = self._slots < self.workers and not self._gathering
      self._slots += int(call.slot)
      self._cond.notify_all()  # a slot holder in its wait window takes it
    if not call.slot:
      call.wake.wait()  # done, or the slot handed over
    if call.slot:
      self._lead(call)
    if call.error is not None:
      raise call.error
    return call.result

  def _lead(self, own: _Call) -> None:
    """Scores batches from the queue until `own` is done, then hands the slot on."""
    try:
      while not own.done:
        batch = self._gather()
        if not batch:  # `own` is being scored in another slot
          break
        self._score(batch)
    finally:
      self._hand_over()
    own.finished.wait()

  def _take(self, batch: list[_Call], rows: int) -> tuple[list[_Call], int, bool]:
    """Moves the oldest queued calls that fit into `batch`; (batch, rows, full)."""
    while self._queue and rows + self._queue[0].rows <= self.max_rows:
      call = self._queue.popleft()
      batch.append(call)
      rows += call.rows
    return batch, rows, bool(self._queue) or rows >= self.max_rows

  def _gather(self) -> list[_Call]:
    with self._cond:
      batch, rows, full = self._take([], 0)
      if not batch or full or self.max_wait <= 0:
        return batch
      self._gathering += 1
      try:
        deadline = batch[0].arrived + self.max_wait
        while not full and (left := deadline - time.monotonic()) > 0:
          self._cond.wait(left)
          batch, rows, full = self._take(batch, rows)
      finally:
        self._gathering -= 1
      self._fill_slots()  # callers left over from a full batch need not wait for it
      return batch

  def _score(self, batch: list[_Call]) -> None:
    results, error = None, None
    try:
      results = self._run([c.request for c in batch])
    except BaseException as e:  # noqa: BLE001 - every caller of the batch gets it
      error = e
    with self._cond:
      self.batches += 1
      self.requests += len(batch)
      for i, call in enumerate(batch):
        call.result, call.error = ((None, error) if error is not None
                                   else (results[i], None))
        call.done = True
    for call in batch:
      call.finished.set()
      call.wake.set()
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
      raise error

  def _hand_over(self) -> None:
    """The slot goes to the oldest queued caller that holds none, or is freed."""
    with self._cond:
      self._slots -= 1
      self._fill_slots()

  def _fill_slots(self) -> None:
    """Free slots to the oldest queued callers without one (the lock is held)."""
    waiting = (c for c in self._queue if not c.slot)
    while self._slots < self.workers and not self._gathering:
      call = next(waiting, None)
      if call is None:
        return
      call.slot = True
      self._slots += 1
      call.wake.set()


# -- recommendations ----------------------------------------------------------------------

@dataclasses.dataclass
class Recommendations:
  """Top-K lists: row r holds user `users[r]`'s items, best first.

  Attributes:
    users: [n] raw ids of the users scored (int64, str, or row numbers).
    items: [n, k] raw item ids (int64 or str); -1 / '' past the allowed items.
    scores: [n, k] float32 scores, descending; -inf past the allowed items (only when
      exclusions leave fewer than k items).
    dense: [n, k] int32 dense item ids (0 past the allowed items).
    unscored: raw ids of the users not scored (no known item in their history).
  """
  users: np.ndarray
  items: np.ndarray
  scores: np.ndarray
  dense: np.ndarray
  unscored: np.ndarray

  def rows(self) -> Iterator[tuple[object, int, object, float]]:
    """(user, rank, item, score) tuples, ranks from 1, in user order."""
    for r, user in enumerate(self.users.tolist()):
      for j in range(self.dense.shape[1]):
        if self.dense[r, j] > 0:
          yield user, j + 1, self.items[r, j].item(), float(self.scores[r, j])


def _notice(message: str) -> None:
  print(f'notice: {message}', file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Encoded:
  """A request's model inputs ([n, L] int32 each), exclusions ([n, H]) and its k."""
  items: np.ndarray
  behaviors: np.ndarray
  gaps: np.ndarray
  exclude: np.ndarray
  k: int


_SETUP = threading.Lock()  # creates a recommender's batcher and thread pool once


class HistoryRecommender:
  """Top-K recommendation from histories; a subclass provides the scorer.

  Subclasses set `vocab`, `batch_size`, `max_k` (and may set `workers`, `max_wait_ms`)
  and implement `score_batch(items, behaviors, gaps, exclude, k)` -> ([B, k] scores,
  [B, k] dense ids) for a batch of B rows, B one of `buckets`. `notify` receives
  notices (stderr by default).

  Thread-safe: `recommend_histories` / `recommend_history` of up to `batch_size` users
  go through a `Batcher`, so concurrent callers are scored together on the smallest
  bucket that holds them all; larger requests are scored `batch_size` users a step,
  `workers` steps at once (`iter_batches`)."""
  vocab: Vocabulary
  batch_size: int = BATCH_SIZE  # the largest bucket, and the step of large requests
  workers: int = 2  # batches scored at once (see `iter_batches`)
  max_wait_ms: float = 0.0  # how long a batch waits for more callers (`Batcher`)
  max_k: int | None = None
  notify: Callable[[str], None] = staticmethod(_notice)
  _batcher: Batcher | None = None
  _pool: concurrent.futures.ThreadPoolExecutor | None = None

  def score_batch(self, items, behaviors, gaps, exclude, k: int):
    raise NotImplementedError

  @property
  def buckets(self) -> tuple[int, ...]:
    return bucket_sizes(self.batch_size)

  @property
  def min_width(self) -> int:
    """The exclusion width of every request of up to `batch_size` users whose
    exclusions fit in it: the power of two that holds L (64 for L = 50), so one program
    a bucket serves 'seen' exclusion of any history of up to L distinct items, 'target'
    and 'none'. (At 99,037 items a call with 64 columns cost what one with 8 did.)"""
    return max(MIN_WIDTH, 1 << (int(self.vocab.max_len) - 1).bit_length())

  def batcher(self) -> Batcher:
    """The batcher of this recommender's small requests (made on first use)."""
    with _SETUP:
      if self._batcher is None:
        self._batcher = Batcher(self._score_requests, max_rows=self.batch_size,
                                max_wait_ms=self.max_wait_ms, workers=self.workers)
      return self._batcher

  def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
    """The threads that score large requests' steps (made on first use, kept)."""
    with _SETUP:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, self.workers), thread_name_prefix='gear-score')
      return self._pool

  def clamp_k(self, k: int) -> int:
    k = int(k)
    if k < 1:
      raise ValueError(f'k must be >= 1, got {k}')
    if k > self.vocab.num_items:
      self.notify(f'k={k} is larger than the catalogue; returning all '
                  f'{self.vocab.num_items:,} items')
      k = self.vocab.num_items
    if self.max_k is not None and k > self.max_k:
      raise ValueError(f'k={k} is larger than the k={self.max_k} this artifact was '
                       'exported with; export again with a larger --k')
    return k

  def score_rows(self, items, behaviors, gaps, exclude, k: int):
    """`score_batch` on n <= `batch_size` rows, padded to the smallest bucket that
    holds them: ([n, k] scores, [n, k] dense ids) as numpy arrays."""
    n = len(items)
    pad = bucket_for(n, self.buckets) - n
    arrays = [items, behaviors, gaps, exclude]
    if pad:
      arrays = [np.pad(a, ((0, pad), (0, 0))) for a in arrays]
    scores, ids = self.score_batch(*arrays, k)
    return np.asarray(scores)[:n], np.asarray(ids)[:n]

  def _score_requests(self, requests: list[_Encoded]) -> list[tuple[np.ndarray, ...]]:
    """The `Batcher`'s scorer: the requests stacked into one bucket, then split; each
    gets its own k (the batch is scored at the largest)."""
    width = max(r.exclude.shape[1] for r in requests)
    ex = [r.exclude if r.exclude.shape[1] == width else
          np.pad(r.exclude, ((0, 0), (0, width - r.exclude.shape[1]))) for r in requests]
    stack = [np.concatenate(arrays) if len(requests) > 1 else arrays[0] for arrays in (
        [r.items for r in requests], [r.behaviors for r in requests],
        [r.gaps for r in requests], ex)]
    scores, ids = self.score_rows(*stack, max(r.k for r in requests))
    out, lo = [], 0
    for r in requests:
      hi = lo + len(r.items)
      out.append((scores[lo:hi, :r.k], ids[lo:hi, :r.k]))
      lo = hi
    return out

  def encode(self, hist: Histories, *, k: int, exclude: str, at, width: int | None = None
             ) -> _Encoded:
    """Every history of `hist` (each with an interaction) as model inputs, its
    exclusions (`width` wide, default: what `hist` needs, at least `min_width`) and
    `k`. `at`: None, a time, or one per history."""
    if width is None:
      width = max(self.min_width, exclusion_width(hist, exclude, self.vocab.target))
    inputs = model_inputs(hist, self.vocab, at)
    return _Encoded(inputs['items'], inputs['behaviors'], inputs['gaps'],
                    exclusions(hist, exclude, self.vocab.target, width), int(k))

  def iter_batches(self, hist: Histories, *, k: int, exclude: str = 'none', at=None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (rows of `hist`, [b, k] scores, [b, k] dense ids) batch by batch, in
    order; users with an empty history are skipped. `k` must already be clamped.

    Up to `batch_size` users are one call on the smallest bucket that holds them, in
    this thread. More are scored `batch_size` a step (every step padded to that one
    shape), `workers` steps at once in this recommender's threads: a CPU runs many of
    the model's small operations on one core, so two batches in flight keep both
    cores of a 2-core machine busy (+10-25 % users/s measured at 99,037 items)."""
    at_all = None if at is None else np.broadcast_to(np.asarray(at, np.int64),
                                                     (len(hist),))
    rows = np.flatnonzero(hist.lengths > 0)
    size = self.batch_size
    if len(rows) <= size:
      if len(rows):
        enc = self.encode(hist.take(rows), k=k, exclude=exclude,
                          at=None if at_all is None else at_all[rows])
        yield (rows, *self.score_rows(enc.items, enc.behaviors, enc.gaps, enc.exclude, k))
      return
    width = exclusion_width(hist, exclude, self.vocab.target)  # one for all batches

    def batch(part):
      enc = self.encode(hist.take(part), k=k, exclude=exclude, width=width,
                        at=None if at_all is None else at_all[part])
      arrays = [enc.items, enc.behaviors, enc.gaps, enc.exclude]
      pad = size - len(part)
      return [np.pad(a, ((0, pad), (0, 0))) for a in arrays] if pad else arrays

    def oldest(pending):
      part, done = pending.popleft()
      scores, ids = done.result()
      return part, np.asarray(scores)[:len(part)], np.asarray(ids)[:len(part)]

    pool, pending = self._executor(), collections.deque()
    for lo in range(0, len(rows), size):
      part = rows[lo:lo + size]
      pending.append((part, pool.submit(self.score_batch, *batch(part), k)))
      if len(pending) >= self.workers:
        yield oldest(pending)
    while pending:
      yield oldest(pending)

  def prepare(self, hist: Histories, *, k: int, at=None) -> tuple[Histories, int]:
    """(`hist` as of `at`, `k` clamped to the catalogue), with notices."""
    k = self.clamp_k(k)
    if at is not None:
      hist, later = hist.as_of(at)
      if later:
        self.notify(f'{later:,} interactions later than the request time were left out')
    return hist, k

  def recommend_histories(self, hist: Histories, *, k: int = 10, exclude: str = 'none',
                          at=None) -> Recommendations:
    """Top-k lists for every user of `hist` that has a known item (see the module
    docstring for `at` and the scored slot). Up to `batch_size` users are scored
    together with other threads' requests (`Batcher`)."""
    hist, k = self.prepare(hist, k=k, at=at)
    rows = np.flatnonzero(hist.lengths > 0)
    if not len(rows) or len(rows) > self.batch_size:
      parts = list(self.iter_batches(hist, k=k, exclude=exclude, at=at))
      rows = np.concatenate([p for p, _, _ in parts]) if parts else rows
      scores = (np.concatenate([s for _, s, _ in parts]) if parts
                else np.zeros((0, k), np.float32))
      dense = (np.concatenate([i for _, _, i in parts]) if parts
               else np.zeros((0, k), np.int32))
    else:
      at_rows = None if at is None else np.broadcast_to(
          np.asarray(at, np.int64), (len(hist),))[rows]
      enc = self.encode(hist.take(rows), k=k, exclude=exclude, at=at_rows)
      scores, dense = self.batcher()(enc, len(rows))
    return Recommendations(
        users=readable(hist.users[rows]), items=self.vocab.raw_items(dense),
        scores=scores, dense=dense, unscored=readable(hist.users[hist.lengths == 0]))

  def recommend_history(self, items: Sequence, behaviors: Sequence, timestamps: Sequence,
                        *, k: int = 10, exclude: str = 'none', at: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One shopper's next buy: raw item ids and scores, best first. `behaviors` are
    names (or ids 1..n_b), `timestamps` seconds; unknown items are left out (an empty
    result when none is known)."""
    hist = Histories.from_lists([items], [behaviors], [timestamps], self.vocab)
    recs = self.recommend_histories(hist, k=k, exclude=exclude, at=at)
    if not len(recs.users):
      return self.vocab.raw_items(np.zeros(0, np.int64)), np.zeros(0, np.float32)
    keep = recs.dense[0] > 0
    return recs.items[0][keep], recs.scores[0][keep]


# -- the exported artifact --------------------------------------------------------------

class ServedModel(HistoryRecommender):
  """An exported recommender: `recommend_history` / `recommend_histories` as in
  `gear_jax.Recommender` (thread-safe; concurrent callers are batched), and
  `score_batch` for pre-built inputs. Each (bucket, exclusion width) is compiled once,
  on first use or by `warmup`."""

  def __init__(self, exported, vocab: Vocabulary, info: dict,
               batch_size: int = BATCH_SIZE, *, max_wait_ms: float = 0.0,
               workers: int = 2):
    self.exported, self.vocab, self.info = exported, vocab, info
    self.max_k = int(info['k'])
    self.batch_size = int(batch_size)
    bucket_sizes(self.batch_size)  # checks it
    self.max_wait_ms, self.workers = float(max_wait_ms), int(workers)
    self._programs: dict[tuple[int, int], Callable] = {}
    self._compiling: dict[tuple[int, int], threading.Lock] = {}  # one lock a shape
    self._setup = threading.Lock()

  def program(self, rows: int, width: int) -> Callable:
    """The exported function compiled for [rows, L] windows and [rows, width]
    exclusions (once per shape; later calls reuse it; other shapes compile meanwhile)."""
    key = (int(rows), int(width))
    fn = self._programs.get(key)
    if fn is None:
      with self._setup:
        lock = self._compiling.setdefault(key, threading.Lock())
      with lock:
        fn = self._programs.get(key)
        if fn is None:
          import jax
          window = jax.ShapeDtypeStruct((key[0], self.vocab.max_len), np.int32)
          fn = jax.jit(self.exported.call).lower(
              window, window, window, jax.ShapeDtypeStruct(key, np.int32)).compile()
          self._programs[key] = fn
    return fn

  def warmup(self, widths: Sequence[int] | None = None) -> float:
    """Compiles every bucket for each exclusion width (default: `min_width`, what
    requests of up to `batch_size` users use unless one excludes more than L items),
    `workers` shapes at once (two threads compiled 1.5x faster than one on 2 cores);
    returns seconds."""
    start = time.perf_counter()
    keys = [(rows, width) for width in (widths or (self.min_width,))
            for rows in self.buckets]
    with concurrent.futures.ThreadPoolExecutor(max(1, self.workers)) as pool:
      for _ in pool.map(lambda key: self.program(*key), keys):
        pass
    return time.perf_counter() - start

  def score_batch(self, items, behaviors, gaps, exclude, k: int):
    """The exported function on [B, L] int32 inputs and [B, H] int32 exclusions:
    ([B, k] scores, [B, k] dense ids) for k <= the exported k."""
    exclude = np.asarray(exclude, np.int32)
    fn = self.program(exclude.shape[0], exclude.shape[1])
    scores, ids = fn(np.asarray(items, np.int32), np.asarray(behaviors, np.int32),
                     np.asarray(gaps, np.int32), exclude)
    return np.asarray(scores)[:, :k], np.asarray(ids)[:, :k]


def load(path: str, *, max_batch: int = BATCH_SIZE, max_wait_ms: float = 0.0,
         workers: int = 2, warmup: bool = False, batch_size: int | None = None
         ) -> ServedModel:
  """Loads an artifact written by ``python -m gear_jax.export`` and its sidecar.

  `max_batch`: the largest bucket (the most users one call scores: merged concurrent
  requests, or one step of a large request; `batch_size` is its former name).
  `max_wait_ms`: how long a batch waits for more concurrent callers (0: a lone request
  never waits). `workers`: batches scored at once. `warmup`: compile every bucket now
  instead of on first use."""
  from jax import export as jax_export
  path = os.fspath(path)
  side = sidecar_path(path)
  for p in (path, side):
    if not os.path.isfile(p):
      raise FileNotFoundError(f'{p} not found (python -m gear_jax.export writes both '
                              f'{os.path.basename(path)} and its {SIDECAR_SUFFIX})')
  with open(path, 'rb') as f:
    data = f.read()
  with open(side) as f:
    info = json.load(f)
  if info.get('format') != FORMAT:
    raise ValueError(f'{side}: format {info.get("format")!r}, expected {FORMAT!r}')
  if info.get('artifact_digest') != digest(data):
    raise ValueError(f'{side} does not belong to {path} (content hash differs): export '
                     'again')
  exported = jax_export.deserialize(bytearray(data))
  model = ServedModel(exported, Vocabulary.from_json(info['vocab']), info,
                      batch_size or max_batch, max_wait_ms=max_wait_ms, workers=workers)
  if warmup:
    model.warmup()
  return model
