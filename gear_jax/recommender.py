"""Recommendations from a trained run: the `Recommender` API, reading user ids and
times, and streaming the rows to a file (the library behind ``python -m
gear_jax.recommend``).

Users are the raw ids of the data file; a known user's history is everything the data
file holds for them (users below ``min_uc`` included: serving is not training). The
scored slot, ``at`` and how items unknown to the model are handled are described in
`gear_jax.serving`, which holds the request side shared with exported artifacts.
Output rows are ``user, rank, item, score`` with raw ids, ranks 1..K, best first; CSV
(with a header) or JSON lines by the extension of the output path.

In Python::

  rec = gear_jax.Recommender.load('runs/demo')
  recs = rec.recommend(['1', '2'], k=10)          # .users, .items, .scores, .rows()
  items, scores = rec.recommend_history(['1021', '88'], ['pv', 'cart'],
                                        [1700000000, 1700000300], k=10)
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from gear_jax import serving
from gear_jax.errors import ConfigError, Interrupted, UserError
from gear_jax.serving import Histories, Recommendations, Vocabulary

OUTPUT_FORMATS = ('.csv', '.jsonl')
_SHOWN = 10  # ids named in a warning before "and N more"


class Recommender(serving.HistoryRecommender):
  """A trained checkpoint that recommends: `recommend` for users of the data file,
  `recommend_history` / `recommend_histories` for any shopper (see `gear_jax.serving`).

  Runs on the first device, `batch_size` users a step, two steps at once."""

  def __init__(self, config, data, trained, *, workdir: str = '',
               batch_size: int = serving.BATCH_SIZE):
    import jax
    from gear_jax import steps
    self.config, self.data, self.workdir = config, data, workdir
    self.model, self.params = trained.model, trained.params
    self.step, self.meta = trained.step, trained.meta
    self.batch_size = int(batch_size)
    self.vocab = Vocabulary(items=data.item_ids, behaviors=tuple(data.behaviors),
                            target=int(data.target), max_len=int(config.data.max_len),
                            users=data.user_ids)
    self._score = jax.jit(functools.partial(steps.recommend_step, model=self.model),
                          static_argnames='k')
    self._known: Histories | None = None

  @classmethod
  def load(cls, workdir: str, *, checkpoint: str = 'best',
           overrides: dict[str, Any] | None = None,
           batch_size: int = serving.BATCH_SIZE
           ) -> Recommender:
    """The run in `workdir` (its config.json, with `overrides` as flat 'section.key'
    values) at checkpoint 'best', 'latest' or a step number."""
    import jax
    from gear_jax import defaults, parallel, rundir
    from gear_jax.data import load_dataset
    config = rundir.read_config(workdir)
    if overrides:
      config.update_from_flattened_dict(dict(overrides))
    defaults.validate_config(config)
    if int(batch_size) < 1:
      raise ConfigError(f'batch size must be >= 1, got {batch_size}', field='--batch_size')
    data, _ = load_dataset(config.data)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    with config.unlocked():
      config.mesh.shard_items = False  # one device: the table is not split
    trained = rundir.load_trained(config, workdir, data, mesh, checkpoint)
    return cls(config, data, trained, workdir=workdir, batch_size=batch_size)

  def score_batch(self, items, behaviors, gaps, exclude, k: int):
    batch = dict(items=items, behaviors=behaviors, gaps=gaps, exclude=exclude)
    scores, ids = self._score(self.params, batch, k=k)
    return np.asarray(scores), np.asarray(ids)

  # -- histories -----------------------------------------------------------------------
  def read_histories(self, path: str, data_config=None) -> Histories:
    """The histories in file `path`, read like the training data (or as `data_config`
    describes: format, csv settings); file:line:field errors as `DataError`."""
    from gear_jax.data import preprocess, readers
    data_config = data_config or self.config.data
    fmt = preprocess.format_from_config(data_config)
    behaviors = tuple(self.config.data.behaviors)
    raw = readers.read_interactions(path, fmt, behaviors)
    to_model = np.array([0] + [self.vocab.behaviors.index(b) + 1
                               if b in self.vocab.behaviors else 0 for b in behaviors],
                        np.int32)  # behaviors the model was not trained on are left out
    return Histories.from_columns(raw.user, raw.item, to_model[raw.behavior],
                                  raw.timestamp, self.vocab)

  def known_histories(self) -> Histories:
    """Every user of the run's data file with everything the file holds for them
    (read once, on first use)."""
    if self._known is None:
      self._known = self.read_histories(self.config.data.path)
    return self._known

  def select_users(self, users: Sequence | str = 'all') -> tuple[Histories, list[str]]:
    """The known histories of raw ids `users` (in that order; 'all' = every user of
    the data file), and the ids that are not in the data file."""
    known = self.known_histories()
    if isinstance(users, str) and users == 'all':
      return known, []
    ids = serving.as_ids(list(users))
    rows = serving.IdIndex(known.users)(ids) - 1
    missing = serving.id_text(ids[rows < 0])
    return known.take(rows[rows >= 0]), missing

  def recommend(self, users: Sequence | str = 'all', *, k: int = 10,
                exclude: str = 'none', at: int | None = None) -> Recommendations:
    """Top-k lists for users of the data file (raw ids; 'all' = every user). Unknown
    ids are left out with a notice."""
    hist, missing = self.select_users(users)
    if missing:
      self.notify(unknown_users_message(missing, self.config.data.path))
    return self.recommend_histories(hist, k=k, exclude=exclude, at=at)


def unknown_users_message(missing: list[str], path: str) -> str:
  shown = ', '.join(repr(m) for m in missing[:_SHOWN])
  more = f' and {len(missing) - _SHOWN:,} more' if len(missing) > _SHOWN else ''
  return f'{len(missing):,} user ids are not in {path}, left out: {shown}{more}'


def parse_time(text: str, divisor: int = 1) -> int:
  """--at: an integer in the data file's timestamp unit, an ISO 8601 date-time
  (UTC unless it names a zone) or 'now' -> seconds."""
  text = text.strip()
  if text == 'now':
    return int(time.time())
  if text.isdigit():
    return int(text) // divisor
  try:
    when = datetime.datetime.fromisoformat(text)
  except ValueError:
    raise ConfigError(f'--at {text!r} is not a time', field='--at',
                      hint="give seconds like the data file's timestamps, an ISO "
                      "date-time such as 2024-05-01T12:00:00, or 'now'") from None
  if when.tzinfo is None:
    when = when.replace(tzinfo=datetime.timezone.utc)
  return int(when.timestamp())


def read_user_ids(path: str) -> list[str]:
  """One raw user id per line (surrounding white space and blank lines ignored)."""
  try:
    with open(path, encoding='utf-8') as f:
      ids = [line.strip() for line in f]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read --users {path}: {e}') from None
  ids = [i for i in ids if i]
  if not ids:
    raise UserError(f'--users {path} holds no user ids',
                    hint='one raw user id per line, or --users all')
  return ids


# -- output -----------------------------------------------------------------------------

def check_output(path: str | None, formats: Sequence[str] | None = OUTPUT_FORMATS
                 ) -> None:
  """Fails before any work when `path` cannot be written (its folder is created) or,
  with `formats`, has another extension."""
  if path is None:
    return
  ext = os.path.splitext(path)[1].lower()
  if formats is not None and ext not in formats:
    raise UserError(f'--output {path}: unknown extension {ext or "(none)"!r}',
                    hint=f'use one of {", ".join(formats)}')
  if os.path.isdir(path):
    raise UserError(f'--output {path} is a directory', hint='give a file name')
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.probe-', dir=directory)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f'cannot write --output {path}: {e.strerror or e}',
                    hint='choose a writable location') from None


class RowWriter:
  """Writes recommendation rows as CSV (user,rank,item,score) or JSON lines."""

  def __init__(self, f: TextIO, fmt: str, vocab: Vocabulary):
    import json
    self.f, self.fmt = f, fmt
    self.rows = 0
    if fmt == '.jsonl':
      self._item = [json.dumps(v) for v in vocab.raw_items(
          np.arange(vocab.num_items + 1)).tolist()]
      self._user = json.dumps
    else:
      self._item = [str(v) for v in vocab.raw_items(
          np.arange(vocab.num_items + 1)).tolist()]
      self._user = str
      f.write('user,rank,item,score\n')

  def write(self, users: np.ndarray, dense: np.ndarray, scores: np.ndarray) -> None:
    """Rows of users [n] (raw ids), dense item ids [n, k] (0 = none) and scores."""
    lines = []
    for user, dense, scores in zip(users.tolist(), dense.tolist(), scores.tolist()):
      u = self._user(user)
      for rank, (i, s) in enumerate(zip(dense, scores), 1):
        if i == 0:
          break
        if self.fmt == '.jsonl':
          lines.append(f'{{"user": {u}, "rank": {rank}, "item": {self._item[i]}, '
                       f'"score": {s:.7g}}}\n')
        else:
          lines.append(f'{u},{rank},{self._item[i]},{s:.7g}\n')
    self.rows += len(lines)
    self.f.write(''.join(lines))


def histories_to_score(rec: Recommender, *, history: str | None, users,
                       format_overrides: dict) -> tuple[Histories, str, Any]:
  """(histories, where they came from, the data config that describes them) for the
  command line: the shoppers of file `history` (read as the run's data file, or as
  `format_overrides` -- ``data.format`` / ``data.csv.*`` -- describe it), else the
  known users `users` ('all' or raw ids; unknown ones warned about and left out)."""
  history_config = rec.config.data
  if format_overrides:
    history_config = history_config.copy_and_resolve_references()
    history_config.update_from_flattened_dict(
        {k[len('data.'):]: v for k, v in format_overrides.items()})
  if history:
    return rec.read_histories(history, history_config), history, history_config
  hist, missing = rec.select_users(users)
  if missing:
    print(f'warning: {unknown_users_message(missing, rec.config.data.path)}',
          file=sys.stderr, flush=True)
  return hist, rec.config.data.path, history_config


def time_divisor(data_config) -> int:
  """What divides the file's timestamps down to seconds (1000 for csv in ms)."""
  return 1000 if (data_config.format == 'csv'
                  and data_config.csv.timestamp_unit == 'ms') else 1


def write_recommendations(rec: Recommender, hist: Histories, source: str, *, k: int,
                          exclude: str, at: int | None, output: str | None,
                          stop=None) -> dict:
  """Scores `hist` batch by batch and streams the rows to `output` (atomically; CSV
  on stdout without it), with warnings, notices and a summary line on stderr. Returns
  the summary's figures. `stop` (a `cli.GracefulStop`) is checked between batches.
  """
  from gear_jax import atomic
  unknown = int(hist.unknown.sum())
  if unknown:
    print(f'warning: {unknown:,} interactions with items the model does not know were '
          f'left out of the histories in {source}', file=sys.stderr, flush=True)
  hist, k = rec.prepare(hist, k=k, at=at)
  empty = _notify_unscored(rec, hist, at)
  start = time.perf_counter()
  stream = _Stream(rec, hist, k=k, exclude=exclude, at=at, output=output, stop=stop,
                   scored=len(hist) - len(empty))
  if output is None:
    rows = stream.write(sys.stdout)
    sys.stdout.flush()
  else:
    with atomic.atomic_write(output, 'w') as f:
      rows = stream.write(f)
  stream.progress.close()
  return _summarize(rec, k, rows, len(empty), stream, time.perf_counter() - start,
                    output)


def _notify_unscored(rec: Recommender, hist: Histories, at: int | None) -> np.ndarray:
  """Notices for the shoppers with nothing to score; returns their rows."""
  empty = np.flatnonzero(hist.lengths == 0)
  for r in empty[:_SHOWN]:
    user = serving.id_text(hist.users[r:r + 1])[0]
    why = (f'none of their {hist.unknown[r]:,} items is known to the model'
           if hist.unknown[r] else 'no interaction' + (' before --at' if at else ''))
    rec.notify(f'user {user!r} not scored: {why}')
  if len(empty) > _SHOWN:
    rec.notify(f'... and {len(empty) - _SHOWN:,} more users not scored')
  return empty


class _Stream:
  """Scores the histories batch by batch and writes their rows; rows are formatted
  and written by a helper thread while the next batch is scored (XLA runs without the
  GIL); at most one batch waits, and the order is kept."""

  def __init__(self, rec, hist, *, k, exclude, at, output, stop, scored):
    from gear_jax import run_log
    self.rec, self.hist, self.k, self.exclude, self.at = rec, hist, k, exclude, at
    self.output, self.stop = output, stop
    self.progress = run_log.Progress(scored, 'recommend')
    self.start = time.perf_counter()
    self.done, self.first = 0, None  # first: (users, seconds) of the first batch

  def write(self, f) -> int:
    ext = os.path.splitext(self.output)[1].lower() if self.output else '.csv'
    writer = RowWriter(f, ext, self.rec.vocab)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = None
      for part, scores, ids in self.rec.iter_batches(self.hist, k=self.k,
                                                     exclude=self.exclude, at=self.at):
        if self.stop is not None and self.stop.requested:
          raise Interrupted(self.stop.signum, 'interrupted: ' + (
              f'{self.output} was not written' if self.output else 'output incomplete'))
        if pending is not None:
          pending.result()
        pending = pool.submit(writer.write, serving.readable(self.hist.users[part]), ids,
                              scores)
        self.done += len(part)
        self.first = self.first or (self.done, time.perf_counter() - self.start)
        self.progress.update(self.done)
      if pending is not None:
        pending.result()
    return writer.rows


def _summarize(rec, k: int, rows: int, not_scored: int, stream: _Stream, seconds: float,
               output: str | None) -> dict:
  """The summary line on stderr and its figures."""
  done, first = stream.done, stream.first
  where = f' -> {output}' if output else ''
  summary = dict(users=done, rows=rows, seconds=seconds, not_scored=not_scored,
                 first_batch_s=first[1] if first else 0.0)
  rate = ''
  if first and done > first[0]:  # the rate after the first batch, which compiles
    summary['users_per_s'] = (done - first[0]) / max(seconds - first[1], 1e-9)
    rate = (f' (first batch {first[1]:.1f}s with compilation, then '
            f'{summary["users_per_s"]:,.0f} users/s)')
  print(f'recommended top {k} of {rec.vocab.num_items:,} items to {done:,} users '
        f'({rows:,} rows) in {seconds:.1f}s{rate}, checkpoint step {rec.step}{where}',
        file=sys.stderr, flush=True)
  return summary
