"""What every gear_jax command line shares: user errors as one message, clean stops.

`main(fn)` wraps an absl main function:
- a `UserError` (bad data, bad config, a refused resume, an unreadable checkpoint, a
  held workdir, a diverged run) prints ``error: <message>`` and its ``  -> <fix>`` line
  on stderr and exits with status 2; any other exception is a bug and keeps its
  traceback;
- `Interrupted` (a clean stop after SIGINT / SIGTERM, see `GracefulStop`) prints its one
  line and exits with 128 + the signal number (130 / 143);
- `PeerLost` (another process of a multi-process run died or cannot be reached, see
  `gear_jax.parallel.peer_guard`) prints ``error: <message>`` and exits with status 75
  (`EXIT_PEER_LOST`, EX_TEMPFAIL: rerun all processes to resume) at once, without
  Python's exit handlers: JAX's shutdown barrier would wait for the lost process and
  then abort.
In a multi-process run a user error or a bug also leaves at once (same status and
output as above), so that the other processes see it as a lost process within seconds
instead of waiting for this one in the shutdown barrier.
Library functions never install signal handlers; the command lines do, here.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from gear_jax.errors import (EXIT_PEER_LOST, Interrupted, PeerLost, UserError,
                             is_failed_read_echo)


def run(main_fn: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
  """How every ``python -m gear_jax.X`` starts: `define_flags()` (the module's own
  absl flags), then ``app.run`` with a flag parser that turns a bad flag (a mistyped
  ``--config.*`` key, a value of the wrong type, a missing required flag, a config
  file that does not load) into one ``error:`` line and exit status 2."""
  from absl import app
  from gear_jax import defaults
  with _user_errors():
    with defaults.flag_errors(sys.argv):
      define_flags()
  app.run(main_fn, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  from absl import flags
  from gear_jax import defaults
  with _user_errors():
    return defaults.parse_flags(flags.FLAGS, argv)


@contextlib.contextmanager
def _user_errors():
  try:
    yield
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


def define_config_file(help_text: str = 'Config file (configs/*.py; '
                       "configs/X.py:sasrec for another model's variant).",
                       required: bool = True) -> None:
  """``--config FILE[:variant]`` with ``--config.*`` overrides."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, help_text, lock_config=True)
  if required:
    flags.mark_flag_as_required('config')


def define_config_overrides(help_text: str) -> None:
  """``--config.*`` overrides of a run's own config.json (no file)."""
  from ml_collections import config_flags
  from gear_jax import defaults
  config_flags.DEFINE_config_dict('config', defaults.get_default_config(), help_text)


def define_run_flags(workdir_help: str = 'Run directory (config.json, checkpoints/).',
                     checkpoint: bool = True) -> None:
  """``--workdir`` (required) and, with `checkpoint`, ``--checkpoint``."""
  from absl import flags
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.mark_flag_as_required('workdir')
  if checkpoint:
    flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")


def config_from_flag(name: str = 'config'):
  """The ConfigDict of a `config_flags` flag (None if not given); synthetic data only
  on purpose (`defaults.synthetic_on_purpose`)."""
  from absl import flags
  from gear_jax import defaults
  return defaults.synthetic_on_purpose(flags.FLAGS[name])


def override_values(name: str = 'config') -> dict:
  """The ``--config.*`` values given on the command line, flat."""
  from absl import flags
  from ml_collections import config_flags
  return dict(config_flags.get_override_values(flags.FLAGS[name]))


def no_arguments(argv: list[str]) -> None:
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')


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
    except PeerLost as e:
      _leave(EXIT_PEER_LOST, f'error: {e}')
    except UserError as e:
      _leave_if_distributed(2, f'error: {e}')
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)
    except Interrupted as e:
      # every process stops at the same step: they leave through the shutdown barrier
      _exiting(e.exit_code)
      print(str(e) or 'interrupted', file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except SystemExit as e:
      _exiting(e.code if isinstance(e.code, int) else 1)
      raise
    except BaseException as e:
      parallel = _parallel()
      if parallel is not None and parallel.is_peer_failure(e):
        # a lost process that showed outside `peer_guard` (or in a cleanup after it)
        _leave(EXIT_PEER_LOST, 'error: ' + parallel.peer_lost_message(e))
      if parallel is not None and parallel.distributed_started():
        sys.excepthook(type(e), e, e.__traceback__)  # the bug's traceback, as usual
        _leave(130 if isinstance(e, KeyboardInterrupt) else 1)
      _exiting(130 if isinstance(e, KeyboardInterrupt) else 1)
      raise
    else:
      _exiting(0)
    finally:
      # A dropped read keeps its exception in a reference cycle (task <-> traceback)
      # that only the cyclic collector frees; collected at interpreter shutdown, it
      # would be printed by Python's default hook, past the filter above.
      gc.collect()
  return wrapped


def _parallel():
  """gear_jax.parallel if this process imported it (it imports JAX: a command line
  that never did has no distributed runtime to care about)."""
  return sys.modules.get('gear_jax.parallel')


def _exiting(code: int) -> None:
  if (parallel := _parallel()) is not None:
    parallel.exiting(code)


def _leave(code: int, line: str | None = None):
  """Ends the process at once: `line` on stderr, stdout and stderr flushed, no exit
  handlers (`gear_jax.parallel.leave`)."""
  if (parallel := _parallel()) is not None:
    parallel.leave(code, line)
  if line:
    print(line, file=sys.stderr)
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError, ValueError):
      stream.flush()
  os._exit(code)


def _leave_if_distributed(code: int, line: str) -> None:
  if (parallel := _parallel()) is not None and parallel.distributed_started():
    _leave(code, line)


def drop_failed_read_echoes(record: logging.LogRecord) -> bool:
  """A logging filter: False (drop) for a record that carries the exception of a
  failed checkpoint read (`is_failed_read_echo`), True for everything else."""
  return not (record.exc_info and record.exc_info[0] is not None
              and is_failed_read_echo(*record.exc_info[:3]))


class GracefulStop:
  """SIGINT / SIGTERM handlers for a run (a context manager; restores the old ones).

  The first signal only records itself (`signum`); the training and evaluation loops
  look at `requested` at every step boundary, save that step and stop cleanly there. A
  second signal (SIGINT or SIGTERM) ends the process at once (exit 128 + its number)
  without unwinding anything: the previous checkpoint is then the resume point (orbax
  commits a checkpoint by an atomic rename)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, notice: str = 'stopping at the next step boundary'):
    self.signum: int | None = None
    self.notice = notice  # what the first signal's line says happens next
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      os.write(2, f'\nsecond {signal.Signals(signum).name}: exiting now\n'.encode())
      os._exit(128 + signum)
    self.signum = signum
    name = signal.Signals(signum).name
    os.write(2, f'\n{name}: {self.notice} (a second signal exits at once)\n'.encode())

  def __enter__(self) -> GracefulStop:
    for s in self.SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def rearm(self) -> None:
    """Installs the handlers again: JAX's distributed runtime installs a SIGTERM
    handler of its own (its preemption notifier) when a multi-process run starts."""
    for s in self.SIGNALS:
      signal.signal(s, self._handle)

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
