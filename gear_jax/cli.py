"""What every gear_jax command line shares: user errors as one message, clean stops.

`main(fn)` wraps an absl main function:
- a `UserError` (bad data, bad config, a refused resume, an unreadable checkpoint, a
  held workdir, a diverged run) prints ``error: <message>`` and its ``  -> <fix>`` line
  on stderr and exits with status 2; any other exception is a bug and keeps its
  traceback;
- `Interrupted` (a clean stop after SIGINT / SIGTERM, see `GracefulStop`) prints its one
  line and exits with 128 + the signal number (130 / 143).
Library functions never install signal handlers; the command lines do, here.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from gear_jax.errors import Interrupted, UserError, is_failed_read_echo


def config_from_flag(name: str = 'config'):
  """The ConfigDict of a `config_flags` flag (None if not given), with synthetic data
  generated only on purpose: a ``data.path`` set on the command line must exist
  unless ``--config.data.synthetic.enabled=True`` is given too (a mistyped path is a
  clean "file not found", never a silently generated data set)."""
  from absl import flags
  from ml_collections import config_flags
  flag = flags.FLAGS[name]
  config = flag.value
  if config is None:
    return None
  overrides = config_flags.get_override_values(flag)
  if 'data.path' in overrides and 'data.synthetic.enabled' not in overrides:
    with config.unlocked():
      config.data.synthetic.enabled = False
  return config


def main(fn: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`fn` with the shared handling of user errors and interrupts (see module doc)."""
  @functools.wraps(fn)
  def wrapped(argv):
    from gear_jax import run_log
    run_log.quiet_libraries()
    # echoes of a failed checkpoint read that was already reported in one line
    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda *e: None if is_failed_read_echo(*e) else previous_hook(*e)
    sys.unraisablehook = lambda u: None if is_failed_read_echo(
        u.exc_type, u.exc_value, u.exc_traceback, u.object) else previous_unraisable(u)
    # a dropped read task collected later is reported by asyncio's logger ("Task
    # exception was never retrieved"), past both hooks
    logging.getLogger('asyncio').addFilter(drop_failed_read_echoes)
    try:
      fn(argv)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)
    except Interrupted as e:
      print(str(e) or 'interrupted', file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    finally:
      # A dropped read keeps its exception in a reference cycle (task <-> traceback)
      # that only the cyclic collector frees; collected at interpreter shutdown, it
      # would be printed by Python's default hook, past the filter above.
      gc.collect()
  return wrapped


def drop_failed_read_echoes(record: logging.LogRecord) -> bool:
  """A logging filter: False (drop) for a record that carries the exception of a
  failed checkpoint read (`is_failed_read_echo`), True for everything else."""
  return not (record.exc_info and record.exc_info[0] is not None
              and is_failed_read_echo(*record.exc_info[:3]))


class GracefulStop:
  """SIGINT / SIGTERM handlers for a run (a context manager; restores the old ones).

  The first signal only records itself (`signum`); the training and evaluation loops
  look at `requested` at every step boundary and stop cleanly there. A second SIGINT
  ends the process at once (exit 130) without unwinding anything: whatever a resume
  needs is on disk already (orbax commits a checkpoint by an atomic rename)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      os.write(2, b'\nsecond interrupt: exiting now\n')
      os._exit(128 + signum)
    if self.signum is None:
      self.signum = signum
      name = signal.Signals(signum).name
      os.write(2, f'\n{name}: stopping at the next step boundary (Ctrl-C again to '
                  'exit at once)\n'.encode())

  def __enter__(self) -> GracefulStop:
    for s in self.SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
