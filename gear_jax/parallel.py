"""Devices, meshes and hosts: one code path from one CPU to many GPUs on many hosts.

A `jax.sharding.Mesh` with axes ('data', 'model'):
- the batch is sharded over 'data' (each process feeds its own slice; global arrays are
  assembled with `jax.make_array_from_process_local_data`);
- parameters are replicated, except that with ``config.mesh.shard_items`` the item
  embedding table (which is also the tied item head) is sharded by rows over 'model'.
  The chunked loss then works on row shards of the logits: XLA's SPMD partitioner turns
  the log-sum-exp and the label gather into reductions over 'model', so the full
  [tokens, V] logits are never gathered on one device.
Everything else is ordinary `jax.jit` with shardings: no hand-written communication.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gear_jax.errors import EXIT_PEER_LOST, ConfigError, PeerLost, UserError

DATA, MODEL = 'data', 'model'


# JAX's distributed runtime (jax 0.10.2): what each timeout does.
# - init_timeout_s -> `initialization_timeout`: how long every process keeps trying to
#   register with the coordinator and waits for all the others to register.
# - heartbeat_timeout_s -> `heartbeat_timeout_seconds`, given to the coordination
#   service (process 0) and to every client: a process that sends no heartbeat for this
#   long is declared dead, and the service then tells every other process (its "error
#   polling"), whose C++ client aborts at once (LOG(FATAL) + abort(); see `_RuntimeWatch`).
#   It is also how long a client goes on without reaching the coordinator. The heartbeats
#   run on a C++ thread: a process busy in Python, in XLA or in I/O keeps sending them.
# - shutdown_timeout_s -> `shutdown_timeout_seconds`: at a normal exit every process
#   waits in a shutdown barrier until all have arrived; past this the barrier fails and
#   the failure is sent to every process still running (which aborts it).
# The client has no other setting jax.distributed passes on: `missed_heartbeat_callback`
# (jaxlib's binding cannot call a Python function with the absl::Status it passes:
# std::bad_cast, std::terminate) and `shutdown_on_destruction` (jax shuts down
# explicitly at exit) are of no use from Python; `jax_enable_recoverability` (an
# experimental flag) stops the service from spreading a failure, but not a client's
# abort when the coordinator itself is lost.
INIT_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 120


def timeouts(distributed_config) -> dict[str, float]:
  """The runtime's timeouts from ``config.distributed`` (keys missing from an older
  run's config keep this module's defaults)."""
  get = distributed_config.get
  return dict(init_timeout_s=float(get('init_timeout_s', INIT_TIMEOUT_S)),
              heartbeat_timeout_s=float(get('heartbeat_timeout_s', HEARTBEAT_TIMEOUT_S)),
              shutdown_timeout_s=float(get('shutdown_timeout_s', SHUTDOWN_TIMEOUT_S)))


def initialize_distributed(coordinator: str = '', num_processes: int = 0,
                           process_id: int = -1, *,
                           init_timeout_s: float = INIT_TIMEOUT_S,
                           heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
                           shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
  """Starts JAX's distributed runtime when running on several processes.

  Explicit settings win; otherwise ``jax.distributed.initialize()`` detects SLURM,
  Open MPI and TPU pods itself, and `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID` are read from the environment. A single plain process does
  nothing. The timeouts are described above (`INIT_TIMEOUT_S` ...).

  Several processes also get the watch over lost processes (`_RuntimeWatch`): when the
  runtime finds that a process died or cannot be reached, this process prints one
  ``error:`` line (see `peer_guard`) and exits with `EXIT_PEER_LOST` instead of the
  runtime's abort. Processes that do not all register within `init_timeout_s` exit
  the same way."""
  if jax.distributed.is_initialized():
    return
  env = os.environ
  coordinator = coordinator or env.get('JAX_COORDINATOR_ADDRESS', '')
  num_processes = num_processes or int(env.get('JAX_NUM_PROCESSES', '0') or 0)
  if process_id < 0:
    process_id = int(env.get('JAX_PROCESS_ID', '-1') or -1)
  in_slurm = int(env.get('SLURM_NTASKS', '1') or 1) > 1
  if not ((coordinator and num_processes > 1) or in_slurm):
    return
  # cross-process collectives between CPU devices (tests, CPU clusters); GPUs use NCCL
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeouts = dict(initialization_timeout=_whole_seconds(init_timeout_s),
                  heartbeat_timeout_seconds=_whole_seconds(heartbeat_timeout_s),
                  shutdown_timeout_seconds=_whole_seconds(shutdown_timeout_s))
  if coordinator and num_processes > 1:
    args = dict(coordinator_address=coordinator, num_processes=num_processes,
                process_id=process_id if process_id >= 0 else None)
    where = f'not all {num_processes} processes reached the coordinator {coordinator}'
  else:
    args = {}
    where = f'not all {env.get("SLURM_NTASKS")} SLURM tasks reached their coordinator'
  _watch.timeouts = dict(init=timeouts['initialization_timeout'],
                         heartbeat=timeouts['heartbeat_timeout_seconds'],
                         shutdown=timeouts['shutdown_timeout_seconds'])
  _watch.install()
  _watch.starting = where
  try:
    jax.distributed.initialize(**args, **timeouts)
  except Exception as e:  # noqa: BLE001 - sorted out below
    if not (is_peer_failure(e) or 'DEADLINE_EXCEEDED' in str(e)):
      raise
    raise PeerLost(_watch.startup_message(e)) from e
  finally:
    _watch.starting = None


def _whole_seconds(t: float) -> int:
  return max(1, int(-(-float(t) // 1)))


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all devices of all processes);
  data=-1 takes what model leaves."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ConfigError(f'mesh.model={model} does not divide the {n} devices',
                      field='config.mesh.model')
  if data == -1:
    data = n // model
  if data * model < n and jax.process_count() == 1:
    devices = devices[:data * model]  # a single process may use fewer devices
  elif data * model != n:
    raise ConfigError(f'mesh.data={data} x mesh.model={model} != {n} devices',
                      field='config.mesh.data', hint='use mesh.data=-1 to take all '
                      'devices')
  return jax.make_mesh((data, model), (DATA, MODEL), devices=devices,
                       axis_types=(AxisType.Auto, AxisType.Auto))


def state_shardings(tree, mesh: Mesh, shard_items: bool):
  """Shardings of parameters or of any state that mirrors them (Adam moments,
  accumulated gradients): replicated, except with `shard_items` every item table
  (a 2-D leaf at .../item_emb/embedding) by rows over 'model'. Pinning the optimizer
  state to the same rule keeps the compiled train step's input and output shardings
  identical, step after step."""
  def spec(path, x):
    if shard_items and _is_table(path) and len(x.shape) == 2:
      return NamedSharding(mesh, P(MODEL, None))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(spec, tree)


# -- the item table sharded over 'model' ---------------------------------------------
# A row-sharded array needs a row count divisible by the 'model' axis, and the table
# has num_items + 1 rows. The training state then holds a table padded with zero rows
# (`table_rows`, `GEAR.table_rows`), cut back before every softmax and ranking;
# checkpoints always hold the real [num_items + 1, d] table (and Adam moments), so a
# checkpoint restores on any mesh. Conversions touch only leaves whose path ends in
# item_emb/embedding (the parameter and its optimizer-state mirrors).

def table_rows(num_items: int, mesh: Mesh, shard_items: bool) -> int:
  """Rows of the item table in the training state (0: the real num_items + 1)."""
  rows, model = num_items + 1, mesh.shape[MODEL]
  padded = -(-rows // model) * model
  return padded if shard_items and padded != rows else 0


def _is_table(path) -> bool:
  keys = [getattr(p, 'key', None) for p in path]
  return keys[-2:] == ['item_emb', 'embedding']


def _canonical_sharding(mesh: Mesh, d: int) -> NamedSharding:
  # by columns where they divide (memory stays spread), else replicated
  return NamedSharding(mesh, P(None, MODEL) if d % mesh.shape[MODEL] == 0 else P())


def canonical_target(target, num_items: int, mesh: Mesh):
  """Restore targets of the checkpoint form of `target` (abstract state leaves)."""
  def leaf(path, x):
    if _is_table(path) and x.shape[0] != num_items + 1:
      return jax.ShapeDtypeStruct((num_items + 1,) + x.shape[1:], x.dtype,
                                  sharding=_canonical_sharding(mesh, x.shape[1]))
    return x
  return jax.tree_util.tree_map_with_path(leaf, target)


def to_canonical(tree, num_items: int, mesh: Mesh):
  """The checkpoint form of state leaves: padded item tables cut to num_items + 1."""
  def leaf(path, x):
    if _is_table(path) and x.shape[0] != num_items + 1:
      return jax.jit(lambda t: t[:num_items + 1],
                     out_shardings=_canonical_sharding(mesh, x.shape[1]))(x)
    return x
  return jax.tree_util.tree_map_with_path(leaf, tree)


def from_canonical(tree, target):
  """Restored checkpoint leaves -> the training state's shapes and shardings."""
  def leaf(path, x, t):
    if _is_table(path) and x.shape != t.shape:
      pad = ((0, t.shape[0] - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)
      return jax.jit(lambda a: jnp.pad(a, pad), out_shardings=t.sharding)(x)
    return x
  return jax.tree_util.tree_map_with_path(leaf, tree, target)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def process_slice() -> tuple[int, int]:
  """(index, count) of this process, for sharding the input pipelines."""
  return jax.process_index(), jax.process_count()


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def abstract_batch(example: dict[str, np.ndarray], mesh: Mesh,
                   process_count: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes/dtypes/shardings of batches like `example` (this process's rows)."""
  sharding = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((v.shape[0] * process_count,) + v.shape[1:], v.dtype,
                                  sharding=sharding) for k, v in example.items()}


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  data = mesh.shape[DATA]
  if batch_size % data or batch_size % jax.process_count():
    raise ConfigError(f'{batch_size} must be divisible by the data axis ({data} '
                      f'devices) and the process count ({jax.process_count()})',
                      field=f'config.{what}')


def to_host(x) -> np.ndarray:
  """An array as numpy on every process (replicated values are read locally)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)



def sync_processes(name: str) -> None:
  """A barrier across processes (nothing to do in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# -- a lost process ----------------------------------------------------------------------
# What the other processes see when one dies or cannot be reached (measured with jax
# 0.10.2 on CPU, two processes on one machine, one killed with SIGKILL):
# - inside a collective (a jitted step over both processes' devices, process_allgather,
#   sync_global_devices): gloo raises at once, since the dead process's sockets close
#   (ValueError "UNKNOWN: Gloo all-reduce failed: ... Read error ...: Connection reset by
#   peer", "Gloo AllGather failed: ... Connection closed by peer"). On GPUs NCCL reports
#   "remote process exited or there was a network error", or hangs (jax-ml/jax#19307);
# - in every process, in a collective or not: the runtime's C++ client aborts the
#   process (LOG(FATAL) "Terminating process because the JAX distributed service
#   detected fatal errors", a C++ stack trace, SIGABRT, Python's "Fatal Python error"
#   dump, exit 134): within a second when the coordinator (process 0) is the one lost,
#   `heartbeat_timeout_s` later otherwise (also when a process hangs: SIGSTOP, a dead
#   node). A process that leaves normally waits in the shutdown barrier for the lost
#   one, then aborts the same way.
# `peer_guard` turns the first into `PeerLost`, which the command line prints as one
# line before leaving with `leave` (no shutdown barrier). `_RuntimeWatch` handles the
# second: it reads what native code writes to stderr, drops the runtime's lines about a
# lost process, delays the abort and leaves first, with the same line.

_GRACE_S = 10.0  # from the first sign of a lost process to leaving, at the latest
_RUNTIME_FILES = frozenset({'coordination_service.cc', 'coordination_service_agent.cc',
                            'preemption_sync_manager.cc', 'preemption_notifier.cc'})
_GLOG = re.compile(r'^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([^:\]\s]+):\d+\] ?(.*)$')
_PEER_TEXT = re.compile('|'.join([
    # CPU collectives: gloo over TCP
    r'\bgloo\b.*(?:failed|error|timed? ?out|closed|reset)',
    # GPU collectives
    r'\bnccl.*(?:remote process exited|network error|ncclRemoteError|unhandled system '
    r'error|connection|socket|timed? ?out|abort)',
    r'remote process exited or there was a network error',
    # the coordination service: heartbeats, barriers, its RPCs
    r'stopped sending heartbeats', r'tasks are unhealthy', r'missing heartbeat',
    r'CoordinationServiceError', r'coordination service', r'/xla\.coordination\.',
    r'shutdown barrier', r'barrier timed out', r'distributed service detected fatal',
    r'\bjax_worker\b']), re.IGNORECASE | re.DOTALL)
_NOT_PEER = re.compile(r'\s*(?:NOT_FOUND|ALREADY_EXISTS|INVALID_ARGUMENT):')


class _RuntimeReport(RuntimeError):
  """What the distributed runtime wrote about a lost process (its log lines)."""


def is_peer_failure(exc: BaseException) -> bool:
  """Whether `exc` (or an exception it was raised from or during) is what a lost
  process produces: a gloo or NCCL collective that failed on a closed connection, or
  the coordination service's report of a process without heartbeats, a failed
  barrier, an unreachable coordinator. A `UserError` or an `AssertionError` never is."""
  return _failure_text(exc) is not None


def _failure_text(exc: BaseException | None) -> str | None:
  seen: set[int] = set()
  while exc is not None and id(exc) not in seen and len(seen) < 16:
    seen.add(id(exc))
    if isinstance(exc, (PeerLost, _RuntimeReport)):
      return str(exc)
    if (isinstance(exc, Exception) and not isinstance(exc, (UserError, AssertionError))
        and _is_peer_text(str(exc))):
      return str(exc)
    exc = exc.__cause__ or exc.__context__
  return None


def _is_peer_text(text: str) -> bool:
  return bool(_PEER_TEXT.search(text)) and not _NOT_PEER.match(text)


def _whoami() -> tuple[int, int]:
  """(this process's id, the process count) of the distributed runtime, without
  starting a backend; (-1, 0) before it starts."""
  from jax._src import distributed
  state = distributed.global_state
  if state.client is None:
    return -1, 0
  return int(state.process_id), int(state.num_processes)


def _unhealthy(text: str) -> list[int]:
  """The processes the coordination service declared dead ('stopped sending
  heartbeats'), from its message."""
  m = re.search(r'stopped sending heartbeats\)?:?', text)
  if not m:
    return []
  rest = text[m.end():m.end() + 400].split('The tasks have crashed')[0]
  ids = re.findall(r'task:(\d+)', rest) or re.findall(r'(?m)^\s*(\d+)\s*,?\s*$', rest)
  return sorted({int(i) for i in ids})


def _coordinator_unreachable(text: str) -> bool:
  if re.search(r'grpc_status:14|Socket closed|failed to connect to all addresses|'
               r'Connection refused|leader task was preempted', text):
    return True
  return bool(re.search(r'UNAVAILABLE|DEADLINE_EXCEEDED', text) and
              re.search(r'CoordinationService/(?!RegisterTask)', text))


def _one_line(text: str, limit: int = 240) -> str:
  """The first meaningful line of a runtime message, without source locations and
  payload dumps."""
  text = text.split('absl::Status: ', 1)[-1]
  text = re.sub(r'\[[\w./+-]+\.(?:cc|h|cpp|cu):\d+\]\s*', '', text)
  text = re.sub(r'\b[\w./+-]+\.(?:cc|h|cpp|cu):\d+:\s*', '', text)
  text = re.sub(r'\s*\[type\.googleapis\.com/[^\]]*\]', '', text)
  text = re.sub(r'^\s*(?:UNKNOWN|INTERNAL):\s*', '', text)
  grpc = re.search(r'grpc_message:"([^"]*)"', text)
  rpc = re.search(r'RPC: /xla\.coordination\.CoordinationService/(\w+)', text)
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  line = lines[0] if lines else 'no details'
  if grpc and grpc.group(1) not in line:
    line = f'{line.rstrip(".")} ({grpc.group(1)})'
  if rpc and rpc.group(1) not in line:
    line = f'{line.rstrip(".")} (RPC {rpc.group(1)})'
  return line if len(line) <= limit else line[:limit - 3] + '...'


def peer_failure_reason(exc: BaseException) -> str:
  """One line on how the loss showed: which process stopped sending heartbeats, which
  collective failed how, that the coordinator cannot be reached."""
  text = _failure_text(exc) or str(exc)
  timeouts = _watch.timeouts
  if ids := _unhealthy(text):
    who = ', '.join(map(str, ids))
    return (f'process{"es" if len(ids) > 1 else ""} {who} stopped sending heartbeats '
            f'(distributed.heartbeat_timeout_s = {timeouts["heartbeat"]} s)')
  if re.search(r'shutdown barrier', text, re.IGNORECASE):
    if _watch.exit_code is None:  # this process was still at work
      return (f'the other processes finished, and the shutdown barrier timed out after '
              f'{timeouts["shutdown"]} s (distributed.shutdown_timeout_s) while this one '
              'was still at work')
    return (f'another process did not reach the shutdown barrier within '
            f'{timeouts["shutdown"]} s (distributed.shutdown_timeout_s)')
  if m := re.search(r'Barrier timed out\. Id: (\S+?)\.? ', text):
    reached = re.search(r'reached the barrier: (\d+/\d+)', text)
    return f'barrier {m.group(1)} timed out' + (
        f' ({reached.group(1)} processes reached it)' if reached else '')
  if re.search(r'\b(?:gloo|nccl)\b', text, re.IGNORECASE) or not _coordinator_unreachable(
      text):
    return _one_line(text)
  grpc = re.search(r'grpc_message:"([^"]*)"', text)
  code = re.search(r'\b(UNAVAILABLE|DEADLINE_EXCEEDED)\b', text)
  if code and re.search(r'CoordinationService/Heartbeat\b', text):
    return (f'the coordinator (process 0) stopped answering heartbeats ({code.group(1)}; '
            f'distributed.heartbeat_timeout_s = {timeouts["heartbeat"]} s)')
  if grpc and code:
    return f'the coordinator (process 0) cannot be reached ({code.group(1)}: {grpc.group(1)})'
  return f'the coordinator (process 0) cannot be reached: {_one_line(text)}'


def lost_process(exc: BaseException) -> int | None:
  """The id of the process that was lost, where the failure tells (None: it does not;
  a failed collective between two processes names the other one)."""
  text = _failure_text(exc)
  if text is None:
    return None
  ids = _unhealthy(text)
  if len(ids) == 1:
    return ids[0]
  if re.search(r'shutdown barrier', text, re.IGNORECASE):
    return None
  me, count = _whoami()
  peer_collective = bool(re.search(r'\b(?:gloo|nccl)\b', text, re.IGNORECASE))
  if me > 0 and not peer_collective and _coordinator_unreachable(text):
    return 0
  if count == 2 and me in (0, 1) and (peer_collective or _coordinator_unreachable(text)):
    return 1 - me
  return None


def peer_lost_message(exc: BaseException, *, step: int | None = None,
                      epoch: int | None = None, resume_step: int | None = None) -> str:
  """The one line of a lost process: ``lost process N of the run at step S (epoch E):
  <reason>; rerun all processes to resume from step L`` ("lost contact with another
  process" where the failure does not say which). `resume_step` is the step of the
  latest checkpoint, 0 when there is none yet; None says "the latest checkpoint"."""
  who = lost_process(exc)
  what = (f'lost process {who} of the run' if who is not None
          else 'lost contact with another process')
  if step is not None:
    what += f' at step {step}' + (f' (epoch {epoch})' if epoch is not None else '')
  resume = (f'from step {resume_step}' if resume_step is not None
            else 'from the latest checkpoint')
  return f'{what}: {peer_failure_reason(exc)}; rerun all processes to resume {resume}'


@contextlib.contextmanager
def peer_guard(describe: Callable[[BaseException], str]) -> Iterator[None]:
  """Turns what a lost process makes a collective, a barrier or the coordination
  service raise inside (`is_peer_failure`) into ``PeerLost(describe(exc))``;
  `describe` returns the message (e.g. `peer_lost_message` with the step and the
  latest checkpoint). It is also what the runtime watch prints when the loss shows
  outside Python (a collective that never returns, the runtime's own abort), so it
  must be quick and only read state (it may run on another thread).

  A lost process cannot be recovered from: once one was seen, this process's stderr is
  muted except for that line, and it leaves within `_GRACE_S` s (`gear_jax.cli.main`
  leaves at once with `PeerLost`)."""
  _watch.guards.append(describe)
  try:
    yield
  except PeerLost:
    raise
  except Exception as e:
    if not is_peer_failure(e):
      raise
    message = _watch.describe(e, describe)
    _watch.lost(e, message=message)
    raise PeerLost(message) from e
  finally:
    guards = _watch.guards
    del guards[len(guards) - 1 - guards[::-1].index(describe)]


def distributed_started() -> bool:
  """Whether this process is one of several of a run (jax.distributed started)."""
  return _whoami()[1] > 1


def exiting(code: int) -> None:
  """Tells the watch that this process is leaving with `code`: a lost process (or a
  failed shutdown barrier) from now on ends it with that code, not `EXIT_PEER_LOST`."""
  _watch.exit_code = int(code)


def leave(code: int, line: str | None = None):
  """Ends the process now with `code`, after `line` on stderr: stdout and stderr are
  flushed, Python's exit handlers (JAX's shutdown barrier among them, which waits for
  the lost process and then aborts) do not run. One call wins; others wait for it."""
  _watch.lock.acquire()  # never released: the first caller prints and exits
  _watch.leaving = True
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  try:
    _watch.drain()
    if line:
      data = (line.rstrip('\n') + '\n').encode('utf-8', 'backslashreplace')
      _watch.write(data)
  finally:
    os._exit(code)


class _Stderr:
  """sys.stderr of a multi-process run: straight to the real stderr, muted once a
  process was lost (a dying run's Python warnings and thread tracebacks)."""

  def __init__(self, stream):
    self._stream, self.muted = stream, False

  def write(self, s):
    return len(s) if self.muted else self._stream.write(s)

  def writelines(self, lines):
    for s in lines:
      self.write(s)

  def __getattr__(self, name):
    return getattr(self._stream, name)


class _RuntimeWatch:
  """What native code writes to stderr (fd 2) goes through a pipe that a thread reads:
  lines pass on to the real stderr, except the distributed runtime's about a lost
  process (from its coordination service, its error polling, its preemption notifier;
  from gloo and NCCL); the first of those starts the end of the process: its fatal
  error (or `_GRACE_S` s) makes the thread print this process's one line and leave
  with `EXIT_PEER_LOST`. The runtime's abort() is delayed by 6 s (a SIGABRT handler
  that sleeps) so that the thread leaves first. Python's own sys.stderr writes to the
  real stderr directly. GEAR_JAX_RAW_STDERR=1 turns all of this off (the runtime's own
  output, for debugging)."""

  def __init__(self):
    self.lock = threading.RLock()
    self.installed = False
    self.guards: list[Callable[[BaseException], str]] = []
    self.timeouts = dict(init=INIT_TIMEOUT_S, heartbeat=HEARTBEAT_TIMEOUT_S,
                         shutdown=SHUTDOWN_TIMEOUT_S)
    self.starting: str | None = None  # while jax.distributed starts: what to say
    self.exit_code: int | None = None
    self.lost_at: float | None = None
    self.lost_exc: BaseException | None = None
    self.message: str | None = None
    self.dropped: list[str] = []
    self.leaving = False
    self._real, self._pipe, self._partial = 2, -1, b''
    self._fatal = False

  def install(self) -> None:
    if self.installed or os.environ.get('GEAR_JAX_RAW_STDERR', '') not in ('', '0'):
      return
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    self._real = os.dup(2)
    self._pipe, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    encoding = getattr(sys.stderr, 'encoding', None) or 'utf-8'
    self._stream = open(self._real, 'w', buffering=1, encoding=encoding,  # noqa: SIM115
                        errors='backslashreplace', closefd=False)
    self._previous_stderr, sys.stderr = sys.stderr, _Stderr(self._stream)
    if faulthandler.is_enabled():  # crash dumps straight out, not into the pipe
      faulthandler.enable(self._stream, all_threads=True)
    _delay_aborts()
    self.installed = True
    threading.Thread(target=self._forward, name='gear_jax-runtime-watch',
                     daemon=True).start()

  # -- the thread ------------------------------------------------------------------------
  def _forward(self) -> None:
    while True:
      try:
        ready = select.select([self._pipe], [], [], 0.2)[0]
      except (OSError, ValueError):
        return
      with self.lock:
        if ready and not self._read():
          return
        if not ready and self._partial and self.lost_at is None:
          self.write(self._partial)  # a line without its end, idle for 0.2 s
          self._partial = b''
        if (self.lost_at is not None and not self.leaving
            and time.monotonic() - self.lost_at > _GRACE_S):
          self._leave_lost()

  def _read(self) -> bool:
    try:
      data = os.read(self._pipe, 65536)
    except OSError:
      return False
    if data:
      *lines, self._partial = (self._partial + data).split(b'\n')
      for line in lines:
        self._line(line + b'\n')
      if len(self._partial) > 65536:
        self._line(self._partial)
        self._partial = b''
      if self._fatal and not self.leaving:
        self._leave_lost()
    return bool(data)

  def _line(self, raw: bytes) -> None:
    text = raw.decode('utf-8', 'replace').rstrip('\n')
    m = _GLOG.match(text)
    if self.lost_at is not None:
      if len(self.dropped) < 200:
        self.dropped.append(m.group(3) if m else text)
      if m and m.group(1) == 'F':
        self._fatal = True  # the runtime's abort follows: leave after this chunk
      return
    if m and self._is_loss(*m.groups()):
      self.lost(None, [m.group(3)])
      self._fatal = m.group(1) == 'F'
      return
    self.write(raw)
    if (m and m.group(1) == 'F') or text.startswith('terminate called'):
      # a C++ abort about something else: the Python stacks go with it (faulthandler
      # does not see this abort, see `_delay_aborts`)
      try:
        faulthandler.dump_traceback(self._stream, all_threads=True)
      except (OSError, ValueError):
        pass

  def _is_loss(self, level: str, file: str, message: str) -> bool:
    if self.starting is not None and level != 'F':
      return False  # retries while the processes start: shown, and not a loss yet
    if level in 'EF':
      return file in _RUNTIME_FILES or _is_peer_text(message)
    return (level == 'W' and file == 'preemption_sync_manager.cc'
            and 'preemption notice' in message)

  # -- a lost process --------------------------------------------------------------------
  def lost(self, exc: BaseException | None, lines=(), message: str | None = None) -> None:
    with self.lock:
      if self.lost_at is None:
        self.lost_at = time.monotonic()
      if exc is not None and self.lost_exc is None:
        self.lost_exc = exc
      if message and not self.message:
        self.message = message
      self.dropped.extend(lines)
      if isinstance(sys.stderr, _Stderr):
        sys.stderr.muted = True

  def describe(self, exc: BaseException, describe=None) -> str:
    if self.message:
      return self.message
    for fn in ([describe] if describe else []) + self.guards[::-1]:
      try:
        return ' '.join(str(fn(exc)).split())
      except Exception:  # noqa: BLE001 - any line beats none
        break
    return peer_lost_message(exc)

  def startup_message(self, exc: BaseException) -> str:
    return (f'could not start the run: {self.starting} within {self.timeouts["init"]} s '
            f'(distributed.init_timeout_s; {_one_line(str(exc))}); start all processes '
            'of the run together')

  def _leave_lost(self) -> None:
    exc = self.lost_exc or _RuntimeReport('\n'.join(self.dropped))
    if self.exit_code is not None:
      code = self.exit_code
      line = (f'warning: {peer_failure_reason(exc)}, while this process was exiting'
              if code == 0 else None)
    elif self.starting is not None:
      code, line = EXIT_PEER_LOST, 'error: ' + self.startup_message(exc)
    else:
      code, line = EXIT_PEER_LOST, 'error: ' + self.describe(exc)
    leave(code, line)

  # -- output ----------------------------------------------------------------------------
  def drain(self) -> None:
    """Passes on what is still in the pipe (the lock is held)."""
    if not self.installed:
      return
    while select.select([self._pipe], [], [], 0)[0] and self._read():
      pass
    if self._partial and self.lost_at is None:
      self.write(self._partial)
    self._partial = b''

  def write(self, data: bytes) -> None:
    try:
      self._stream.flush()
      while data:
        data = data[os.write(self._real, data):]
    except (OSError, ValueError, AttributeError):
      if not self.installed:
        try:
          os.write(2, data)
        except OSError:
          pass


def _delay_aborts() -> None:
  """SIGABRT runs sleep(6) (its argument is the signal number) before the process
  dies: the runtime's abort after a lost process gives the watch 6 s to leave with the
  run's exit code first. (A C function as the handler: Python handlers run later, on
  the main thread.) Linux and macOS; elsewhere nothing."""
  try:
    import ctypes
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal(int(signal.SIGABRT), ctypes.cast(libc.sleep, ctypes.c_void_p))
  except (OSError, AttributeError, TypeError):
    pass


_watch = _RuntimeWatch()
