"""The one exception type for bad input data and data settings."""

from __future__ import annotations


class DataError(ValueError):
  """Bad input: names the file, the line and the field where it can, and a fix.

  Raised before anything is compiled or cached, so a failed run leaves caches and
  checkpoints exactly as they were.
  """

  def __init__(self, message: str, *, path: str | None = None,
               line: int | None = None, field: str | None = None,
               hint: str | None = None):
    self.path, self.line, self.field, self.hint = path, line, field, hint
    where = []
    if path is not None:
      where.append(str(path) + (f':{line}' if line is not None else ''))
    if field is not None:
      where.append(f'field {field!r}')
    text = (', '.join(where) + ': ' if where else '') + message
    if hint:
      text += f'\n  -> {hint}'
    super().__init__(text)
