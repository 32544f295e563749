"""An advisory lock on a workdir, held for the whole of a run that writes there.

The lock is ``fcntl.flock`` on ``<workdir>/.lock``; the file also records the holder
(pid, host, command, start time) so that a refused second process can say who holds
it. The operating system drops a flock when its holder dies, so a lock left behind by
a killed process is simply taken over; the record it left is reported as a notice.
On a clean release the record is emptied. The lock is re-entrant within a process
(the command line takes it early, the library call inside takes it again).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from gear_jax.errors import RunLocked

LOCK_NAME = '.lock'
_HELD: dict[str, int] = {}  # lock path -> nesting depth in this process


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``with WorkdirLock(workdir, 'train'):`` refuses a second holder (`RunLocked`)."""

  def __init__(self, workdir: str, purpose: str):
    self.workdir, self.purpose = os.path.abspath(workdir), purpose
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None
    self._nested = False

  def _read(self, fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
      return json.loads(raw) if raw.strip() else {}
    except ValueError:
      return {'unreadable': raw[:80]}

  def acquire(self) -> None:
    if self._fd is not None or _HELD.get(self.path):
      _HELD[self.path] += 1
      self._nested = True
      return
    self._nested = False
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read(fd)
      os.close(fd)
      who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
             f"({holder.get('purpose', '?')} since {holder.get('started', '?')})")
      raise RunLocked(f'{self.workdir} is in use by {who}',
                      hint='wait for that run to end (or stop it), or use another '
                      '--workdir') from None
    previous = self._read(fd)
    if previous:
      host, pid = previous.get('host'), previous.get('pid')
      state = ('not running' if host == socket.gethostname() and isinstance(pid, int)
               and not _pid_alive(pid) else 'no longer holding it')
      print(f'notice: taking over the lock of {self.workdir} left by pid {pid} on '
            f'{host} ({state})', file=sys.stderr, flush=True)
    record = dict(pid=os.getpid(), host=socket.gethostname(), purpose=self.purpose,
                  started=time.strftime('%Y-%m-%d %H:%M:%S'),
                  command=' '.join(sys.argv)[:300])
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + '\n').encode())
    os.fsync(fd)
    self._fd = fd
    _HELD[self.path] = 1

  def release(self) -> None:
    if self._nested:
      _HELD[self.path] -= 1
      self._nested = False
      return
    if self._fd is None:
      return
    _HELD.pop(self.path, None)
    try:
      os.ftruncate(self._fd, 0)
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
