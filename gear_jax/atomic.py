"""Atomic file writes: a file appears complete under its name, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb'):
  """Yields a file object for a temporary file beside `path` (parent directories are
  created); on success it is flushed, fsynced and renamed over `path`. On any error
  the temporary file is removed and `path` is untouched, so a crash never leaves a
  half-written cache, data set or metrics file under the real name."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp',
                             dir=directory)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
