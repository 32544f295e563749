"""The errors a user can fix, one class per cause.

The command lines (`gear_jax.cli.main`) print a `UserError` as ``error: <message>``
plus a ``  -> <fix>`` line and exit with status 2; any other exception is a bug and
keeps its traceback. Messages name what is wrong (file, line, field, checkpoint step,
config key) and the fix says what to do about it.

`PeerLost` is not a user error: another process of a multi-process run died or became
unreachable. The command lines print it as one ``error:`` line and exit with
`EXIT_PEER_LOST` (75, EX_TEMPFAIL: rerunning all processes resumes the run).
"""

from __future__ import annotations

import inspect
import os


class UserError(Exception):
  """Something the user can fix: a message and, where there is one, a fix."""

  def __init__(self, message: str, *, hint: str | None = None):
    self.message, self.hint = message, hint
    super().__init__(message + (f'\n  -> {hint}' if hint else ''))


class ConfigError(UserError, ValueError):
  """A config value that is invalid or inconsistent (`field` names the key)."""

  def __init__(self, message: str, *, field: str | None = None,
               hint: str | None = None):
    self.field = field
    super().__init__((f'field {field!r}: ' if field else '') + message, hint=hint)


class ResumeRefused(UserError, ValueError):
  """The workdir holds a run that the current config or data cannot continue."""


class CheckpointError(UserError):
  """A checkpoint that is missing or cannot be read (`step`: which one, if known)."""

  def __init__(self, message: str, *, hint: str | None = None, step: int | None = None):
    self.step = step
    super().__init__(message, hint=hint)


class RunLocked(UserError):
  """Another live process holds the workdir."""


class TrainingDiverged(UserError, FloatingPointError):
  """A non-finite loss or gradient; nothing of the bad step was saved."""


EXIT_PEER_LOST = 75  # EX_TEMPFAIL (sysexits.h): "try again later"; a scheduler requeues


class PeerLost(Exception):
  """Another process of the run died or cannot be reached (`gear_jax.parallel.peer_guard`
  raises it); the message says what was lost, at which step, and where a rerun of all
  processes resumes. Exit status `EXIT_PEER_LOST`."""

  exit_code = EXIT_PEER_LOST


class Interrupted(Exception):
  """SIGINT / SIGTERM stopped a run cleanly at a step boundary."""

  def __init__(self, signum: int, message: str = ''):
    self.signum = signum
    super().__init__(message)

  @property
  def exit_code(self) -> int:
    return 128 + int(self.signum)


def is_failed_read_echo(exc_type, exc, tb, obj=None) -> bool:
  """Whether an exception printed outside the normal flow (sys.unraisablehook,
  sys.excepthook) only echoes a failed orbax restore that was already raised and
  reported: orbax reads arrays in concurrent coroutines and tasks, and when one read
  fails the others are dropped and print their own errors when collected (pages of
  tensorstore specs); tensorstore also completes reads on its threads after orbax
  closed its event loop ('RuntimeError: Event loop is closed')."""
  if inspect.iscoroutine(obj) and 'orbax' in str(getattr(obj, 'cr_code', '')):
    return True
  files = []
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  if exc_type is RuntimeError and str(exc) == 'Event loop is closed':
    return bool(files) and files[-1].endswith(os.path.join('asyncio', 'base_events.py'))
  serialization = os.path.join('orbax', 'checkpoint', '_src', 'serialization')
  return any(serialization in f for f in files)
