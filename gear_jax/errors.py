"""The errors a user can fix, one class per cause.

The command lines (`gear_jax.cli.main`) print a `UserError` as ``error: <message>``
plus a ``  -> <fix>`` line and exit with status 2; any other exception is a bug and
keeps its traceback. Messages name what is wrong (file, line, field, checkpoint step,
config key) and the fix says what to do about it.
"""

from __future__ import annotations


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


class Interrupted(Exception):
  """SIGINT / SIGTERM stopped a run cleanly at a step boundary."""

  def __init__(self, signum: int, message: str = ''):
    self.signum = signum
    super().__init__(message)

  @property
  def exit_code(self) -> int:
    return 128 + int(self.signum)
