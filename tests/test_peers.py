"""A lost process of a multi-process run: the others stop at once, with one line and 75.

Two real processes on 127.0.0.1 run tests/peer_worker.py: the real command-line wrapper
(`gear_jax.cli.main`), the real `parallel.initialize_distributed`, and a loop over the
collectives the trainer runs (`process_allgather`, a jitted step on a batch sharded over
both processes' CPU devices, `sync_global_devices`) inside `parallel.peer_guard`. One
process is killed (SIGKILL) or frozen (SIGSTOP) mid-loop; the other must exit within
30 s with status 75 (`EXIT_PEER_LOST`) and exactly one ``error:`` line on stderr, with
no traceback, no "Fatal Python error" and no C++ "Check failure". The quick tests at
the end check what counts as a lost process, on the runtime's messages.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from gear_jax import parallel
from gear_jax.errors import EXIT_PEER_LOST, ConfigError, PeerLost

LIMIT_S = 30
NOISE = ('Traceback', 'Fatal Python error', 'Check failure', 'client.h', '*** ',
         'coordination_service')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Pair:
  """Two worker processes; their stdout and stderr go to files in `tmp`."""

  def __init__(self, tmp, *args):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}',
               JAX_NUM_PROCESSES='2')
    env.pop('XLA_FLAGS', None)  # one CPU device per process
    self.files = [(tmp / f'out{i}', tmp / f'err{i}') for i in range(2)]
    self.procs = []
    for i, (out, err) in enumerate(self.files):
      with open(out, 'w') as o, open(err, 'w') as e:
        self.procs.append(subprocess.Popen(
            [sys.executable, 'tests/peer_worker.py', *args], cwd=REPO, stdout=o,
            stderr=e, env=dict(env, JAX_PROCESS_ID=str(i))))

  def out(self, i):
    return self.files[i][0].read_text()

  def err(self, i):
    return self.files[i][1].read_text()

  def wait_for_step(self, step, timeout=120):
    deadline = time.monotonic() + timeout
    while not all(f'step {step}\n' in self.out(i) for i in range(2)):
      assert time.monotonic() < deadline, (self.err(0)[-2000:], self.err(1)[-2000:])
      assert all(p.poll() is None for p in self.procs), (self.err(0), self.err(1))
      time.sleep(0.05)

  def wait(self, i, timeout):
    try:
      return self.procs[i].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      return None

  def close(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
      p.wait()


@pytest.fixture
def pair(tmp_path):
  made = []

  def start(*args):
    made.append(Pair(tmp_path, *args))
    return made[-1]
  yield start
  for p in made:
    p.close()


def _check_lost(pair, survivor, victim, seconds):
  rc = pair.wait(survivor, LIMIT_S)
  err = pair.err(survivor)
  assert rc == EXIT_PEER_LOST, (rc, err[-3000:])
  elapsed = time.monotonic() - seconds
  assert elapsed < LIMIT_S, elapsed
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), err[-3000:]
  assert not any(n in err for n in NOISE), err
  line = lines[0]
  assert re.match(rf'error: lost process {victim} of the run at step \d+ \(epoch 0\): .+; '
                  r'rerun all processes to resume from step \d+$', line), line
  return line, elapsed


@pytest.mark.slow
@pytest.mark.parametrize('mode,victim', [('allgather', 1), ('sharded', 1), ('all', 0)])
def test_killed_process_stops_the_other(pair, mode, victim):
  """SIGKILL in a loop of collectives: the other process's collective fails at once
  (gloo: the dead process's connections close); with victim 0 the coordination service
  goes too."""
  p = pair('--mode', mode)
  p.wait_for_step(20)
  os.kill(p.procs[victim].pid, signal.SIGKILL)
  t0 = time.monotonic()
  line, elapsed = _check_lost(p, 1 - victim, victim, t0)
  assert elapsed < 10, (elapsed, line)
  step = int(re.search(r'at step (\d+)', line).group(1))
  assert f'step {step - 1}\n' in p.out(1 - victim)  # the step it was at


@pytest.mark.slow
def test_frozen_process_is_found_by_the_heartbeats(pair):
  """SIGSTOP: the other process's collective never returns; the coordination service
  finds the missing heartbeats and the runtime watch leaves in place of its abort."""
  p = pair('--mode', 'all', '--heartbeat_timeout_s', '4')
  p.wait_for_step(20)
  os.kill(p.procs[1].pid, signal.SIGSTOP)
  t0 = time.monotonic()
  line, _ = _check_lost(p, 0, 1, t0)
  assert 'process 1 stopped sending heartbeats (distributed.heartbeat_timeout_s = 4 s)' \
      in line


@pytest.mark.slow
def test_lost_outside_any_collective(pair):
  """Process 1 killed while process 0 runs no collective (it sleeps inside the guard):
  the heartbeats tell, and the line still has the step."""
  p = pair('--mode', 'idle', '--heartbeat_timeout_s', '4')
  p.wait_for_step(20)
  os.kill(p.procs[1].pid, signal.SIGKILL)
  t0 = time.monotonic()
  line, _ = _check_lost(p, 0, 1, t0)
  assert 'stopped sending heartbeats' in line


@pytest.mark.slow
def test_user_error_in_one_process(pair):
  """A user error in process 1 ends it at once with its own line and 2, not through
  the shutdown barrier; process 0 sees a lost process."""
  p = pair('--mode', 'all', '--fail_at', '20')
  assert p.wait(1, LIMIT_S) == 2
  assert p.err(1).strip() == "error: field 'config.x': a bad value found by process 1"
  _check_lost(p, 0, 1, time.monotonic())


@pytest.mark.slow
def test_a_normal_run_is_untouched(pair):
  p = pair('--mode', 'all', '--steps', '30')
  assert [p.wait(i, 120) for i in range(2)] == [0, 0], (p.err(0), p.err(1))
  for i in range(2):
    assert p.out(i).endswith('step 29\ndone\n')
    assert not [ln for ln in p.err(i).splitlines() if not ln.startswith('[Gloo]')], \
        p.err(i)


# -- what counts as a lost process (no processes started) ---------------------------------

GLOO = ValueError('UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc'
                  ':538] Read error [127.0.0.1]:1953: Connection reset by peer')
HEARTBEATS = RuntimeError('UNAVAILABLE: The following tasks are unhealthy (stopped sending '
                          'heartbeats):\n1\nThe tasks have crashed. Check the task logs')
NCCL = RuntimeError('INTERNAL: external/xla/xla/service/gpu/nccl_utils.cc:216: NCCL '
                    'operation async_err failed: remote process exited or there was a '
                    'network error')
BARRIER = RuntimeError('DEADLINE_EXCEEDED: Barrier timed out. Id: step_3. This usually '
                       'happens ...\n# of tasks that reached the barrier: 1/2.\n')
COORDINATOR = RuntimeError(
    'UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was '
    'preempted/died/restarted unexpectedly\nAdditional GRPC error information from remote '
    'target coordination_service while calling /xla.coordination.CoordinationService/'
    'PollForError:\n:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:'
    '"Socket closed"}')


@pytest.mark.parametrize('exc,reason', [
    (GLOO, 'Gloo all-reduce failed: Read error [127.0.0.1]:1953: Connection reset by peer'),
    (HEARTBEATS, 'process 1 stopped sending heartbeats'),
    (NCCL, 'NCCL operation async_err failed: remote process exited or there was a '
     'network error'),
    (BARRIER, 'barrier step_3 timed out (1/2 processes reached it)'),
    (COORDINATOR, 'the coordinator (process 0) cannot be reached (UNAVAILABLE: Socket '
     'closed)'),
])
def test_peer_failures_and_their_reasons(exc, reason):
  assert parallel.is_peer_failure(exc)
  assert parallel.peer_failure_reason(exc).startswith(reason)
  try:  # also when it is the cause or the context of another exception
    try:
      raise exc
    except Exception as e:
      raise OSError('while closing the checkpoints') from e
  except OSError as wrapped:
    assert parallel.is_peer_failure(wrapped)


@pytest.mark.parametrize('exc', [
    BrokenPipeError(32, 'Broken pipe'), ConnectionResetError(104, 'Connection reset by peer'),
    ConfigError('gloo failed'), AssertionError('sync_global_devices name mismatch'),
    RuntimeError("NCCL operation ncclCommInitRank(&comm, nranks, id, rank) failed: "
                 "unhandled cuda error"), KeyboardInterrupt(), ValueError('bad shape')])
def test_other_errors_are_not_peer_failures(exc):
  assert not parallel.is_peer_failure(exc)


def test_peer_guard_and_the_message(monkeypatch):
  monkeypatch.setattr(parallel, '_whoami', lambda: (0, 2))
  assert parallel.lost_process(GLOO) == 1  # of two processes, the other one
  assert parallel.lost_process(HEARTBEATS) == 1
  assert parallel.lost_process(BARRIER) is None
  assert parallel.peer_lost_message(GLOO, step=7, epoch=1, resume_step=5) == (
      'lost process 1 of the run at step 7 (epoch 1): Gloo all-reduce failed: Read error '
      '[127.0.0.1]:1953: Connection reset by peer; rerun all processes to resume from '
      'step 5')
  assert parallel.peer_lost_message(BARRIER).startswith('lost contact with another process: ')
  monkeypatch.setattr(parallel._watch, 'lost', lambda *a, **k: None)  # no muting here
  with pytest.raises(PeerLost, match='^lost process 1 of the run at step 3') as info:
    with parallel.peer_guard(lambda e: parallel.peer_lost_message(e, step=3)):
      raise GLOO
  assert info.value.exit_code == EXIT_PEER_LOST == 75 and info.value.__cause__ is GLOO
  with pytest.raises(ValueError, match='bad shape'):  # anything else passes unchanged
    with parallel.peer_guard(lambda e: 'unused'):
      raise ValueError('bad shape')
  assert parallel._watch.guards == []
