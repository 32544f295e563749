"""The workdir record of a run: config.json, metrics.jsonl, TensorBoard events,
summary.json, and the console progress (process 0 only).

Files are replaced atomically (temporary file + rename) so a killed run never leaves a
half-written JSON file behind; metrics.jsonl is truncated to the resumed epoch on
restart so it never holds the same epoch twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

from gear_jax import atomic


def quiet_libraries() -> None:
  """orbax and grain log every file they write at INFO: CLIs show warnings and errors
  unless the user asked for --verbosity."""
  from absl import flags, logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def atomic_write_text(path: str, text: str) -> None:
  with atomic.atomic_write(path, 'w') as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_plain) + '\n')


def _plain(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.ndarray,)):
    return x.tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f'not JSON serialisable: {type(x)}')


def read_metrics(workdir: str) -> list[dict]:
  """The rows of metrics.jsonl (a torn last line of a killed run is left out)."""
  return read_metrics_checked(workdir)[0]


def read_metrics_checked(workdir: str) -> tuple[list[dict], int]:
  """(rows of metrics.jsonl, bytes of a torn last line that was left out, 0 if none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return [], 0
  out = []
  with open(path) as f:
    for line in f:
      text = line.strip()
      if text:
        try:
          out.append(json.loads(text))
        except json.JSONDecodeError:
          return out, len(line)  # a torn last line of a killed run
  return out, 0


def _scalars_of(record: dict) -> dict[str, float]:
  return {k: v for k, v in record.items() if '/' in k and isinstance(v, (int, float))}


class RunLog:
  """Writes the workdir record; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self._tensorboard = tensorboard
    self._tb = None  # the events file is opened with the first scalar written
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def write_config(self, config_dict: dict) -> None:
    if self.enabled:
      write_json(os.path.join(self.workdir, 'config.json'), config_dict)

  def truncate_metrics(self, before_epoch: int, last: dict | None = None) -> None:
    """Keeps only the records of epochs < before_epoch (the resumed state). `last`,
    the record saved in the resumed checkpoint, is appended when the file lacks it
    (a run killed after the checkpoint was committed but before its line was
    written)."""
    if not self.enabled:
      return
    kept = [r for r in read_metrics(self.workdir) if r.get('epoch', -1) < before_epoch]
    if last is not None and all(r.get('epoch') != last.get('epoch') for r in kept):
      kept.append(last)
      self.scalars(last['step'], _scalars_of(last))
    atomic_write_text(os.path.join(self.workdir, 'metrics.jsonl'),
                      ''.join(json.dumps(r, default=_plain) + '\n' for r in kept))

  def append_metrics(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record, default=_plain) + '\n')
      f.flush()
      os.fsync(f.fileno())
    self.scalars(record['step'], _scalars_of(record))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not (self.enabled and self._tensorboard):
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2
    if self._tb is None:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._tb = EventFileWriter(os.path.join(self.workdir, 'tensorboard'))
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary))

  def write_summary(self, summary: dict) -> None:
    if self.enabled:
      write_json(os.path.join(self.workdir, 'summary.json'), summary)

  def close(self) -> None:
    if self._tb:
      self._tb.close()
      self._tb = None


class Progress:
  """An in-place progress line on a terminal (silent when not attached to one)."""

  def __init__(self, total: int, desc: str, enabled: bool = True):
    self.total, self.desc = total, desc
    self.enabled = enabled and sys.stderr.isatty()
    self.start = time.perf_counter()
    self._last = 0.0

  def update(self, done: int, extra: str = '') -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if now - self._last < 0.25 and done < self.total:
      return
    self._last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else 0.0
    width = 24
    fill = int(width * done / max(self.total, 1))
    sys.stderr.write(f'\r{self.desc} [{"#" * fill}{"." * (width - fill)}] '
                     f'{done}/{self.total} {extra} eta {format_seconds(eta)}   ')
    sys.stderr.flush()

  def close(self) -> None:
    if self.enabled:
      sys.stderr.write('\r' + ' ' * 100 + '\r')
      sys.stderr.flush()


def format_seconds(s: float) -> str:
  s = int(round(s))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{s % 3600 // 60:02d}m'
