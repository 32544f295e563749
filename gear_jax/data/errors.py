"""The one exception type for bad input data."""

from __future__ import annotations

from gear_jax.errors import UserError


class DataError(UserError, ValueError):
  """Bad input data: names the file, the line and the field where it can, and a fix.

  Raised before anything is compiled or cached, so a failed run leaves caches and
  checkpoints exactly as they were.
  """

  def __init__(self, message: str, *, path: str | None = None,
               line: int | None = None, field: str | None = None,
               hint: str | None = None):
    self.path, self.line, self.field = path, line, field
    where = []
    if path is not None:
      where.append(str(path) + (f':{line}' if line is not None else ''))
    if field is not None:
      where.append(f'field {field!r}')
    super().__init__((', '.join(where) + ': ' if where else '') + message, hint=hint)
