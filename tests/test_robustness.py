"""Clean failures through the command lines: user errors in one line with exit 2, the
workdir lock, damaged checkpoints, Ctrl-C / SIGTERM, synthetic data only on purpose."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_module
from gear_jax import lock as lock_lib
from gear_jax import run_log

TIMING_KEYS = ('train_s', 'eval_s', 'train/seq_per_s')


def _metrics(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in run_log.read_metrics(str(workdir))]


def _error_lines(stderr: str) -> list[str]:
  """stderr without the lines that absl/XLA may print on start."""
  return [l for l in stderr.splitlines() if l.strip()
          and not l.startswith(('WARNING: All log messages', 'I0000', 'W0000', 'E0000'))]


@pytest.fixture(scope='module')
def data_args(tmp_path_factory):
  """configs/test.py on its own data file and cache (generated once here)."""
  from gear_jax.data import synthetic
  d = tmp_path_factory.mktemp('robust')
  path = d / 'syn.txt'
  synthetic.write_tsv(path, synthetic.generate(300, 150, seed=0))
  return ['--config', 'configs/test.py', f'--config.data.path={path}',
          f'--config.data.cache_dir={d / "cache"}']


@pytest.fixture(scope='module')
def three_epochs(data_args, tmp_path_factory):
  """A 3-epoch run whose best checkpoint (step 20) is not its latest (step 30), and
  its 4-epoch extension as the reference for resumed runs."""
  lr = '--config.train.lr=0.3'  # a high rate, so that the metric falls in epoch 2
  ref = tmp_path_factory.mktemp('ref4')
  out = run_module('gear_jax.train', *data_args, lr, '--config.train.num_epochs=4',
                   '--workdir', str(ref))
  assert out.returncode == 0, out.stderr[-2000:]
  run = tmp_path_factory.mktemp('run3')
  out = run_module('gear_jax.train', *data_args, lr, '--config.train.num_epochs=3',
                   '--workdir', str(run))
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(os.listdir(run / 'checkpoints')) == ['20', '30']
  assert json.loads((run / 'summary.json').read_text())['best_step'] == 20
  return run, ref, [*data_args, lr]


def _damage(workdir, step: int) -> None:
  """Empties the data files of a checkpoint's parameters (as a full disk or a cut
  copy would leave them)."""
  params = workdir / 'checkpoints' / str(step) / 'params'
  files = [p for p in params.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for p in files:
    p.write_bytes(b'')


# -- one error path ----------------------------------------------------------------------

def test_config_error_is_one_line(tmp_path):
  out = run_module('gear_jax.train', '--config', 'configs/test.py', '--workdir',
                   str(tmp_path / 'w'), '--config.model.precision=fp8')
  assert out.returncode == 2
  lines = _error_lines(out.stderr)
  assert lines[0].startswith("error: field 'config.model.precision': 'fp8' is not one")
  assert len(lines) <= 2 and 'Traceback' not in out.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_garbage_input_is_shown_escaped(tmp_path):
  path = tmp_path / 'bad.txt'
  path.write_bytes(b'1\t2\tpv\t100\n' + b'\x1b[31m\xff\xfe' + b'A' * 500 + b'\t9\n')
  out = run_module('gear_jax.data.stats', '--config', 'configs/retail.py',
                   f'--config.data.path={path}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  line = _error_lines(out.stderr)[0]
  assert 'bad.txt:2' in line and '\x1b' not in out.stderr
  assert '\\x1b' in line and len(line) < 400


def test_mistyped_data_path_is_not_generated(tmp_path):
  typo = tmp_path / 'typo' / 'file.txt'
  for config in ('configs/test.py', 'configs/demo.py'):
    out = run_module('gear_jax.train', '--config', config, '--workdir',
                     str(tmp_path / 'w'), f'--config.data.path={typo}')
    assert out.returncode == 2, out.stderr[-2000:]
    assert 'file not found' in out.stderr and 'Traceback' not in out.stderr
    assert 'synthetic.enabled=True' in out.stderr
    assert not typo.exists()
  # asked for explicitly, it is generated
  out = run_module('gear_jax.data.stats', '--config', 'configs/test.py',
                   f'--config.data.path={typo}', '--config.data.synthetic.enabled=True',
                   f'--config.data.cache_dir={tmp_path / "cache"}', '--json')
  assert out.returncode == 0, out.stderr[-2000:]
  assert typo.exists() and json.loads(out.stdout)['num_users'] == 300


# -- the workdir lock --------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_fast(data_args, tmp_path):
  first = subprocess.Popen([sys.executable, '-m', 'gear_jax.train', *data_args,
                            '--config.train.num_epochs=2', '--workdir', str(tmp_path)],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  lock_file = tmp_path / lock_lib.LOCK_NAME
  deadline = time.time() + 120
  while not (lock_file.exists() and lock_file.read_text().strip()):
    assert time.time() < deadline and first.poll() is None
    time.sleep(0.05)
  start = time.perf_counter()
  second = run_module('gear_jax.train', *data_args, '--config.train.num_epochs=2',
                      '--workdir', str(tmp_path))
  elapsed = time.perf_counter() - start
  assert second.returncode == 2
  lines = _error_lines(second.stderr)
  assert lines[0].startswith('error: ') and f'pid {first.pid} on ' in lines[0]
  assert 'Traceback' not in second.stderr and len(lines) == 2
  assert elapsed < 2.0, elapsed
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]  # the first run is unharmed
  assert [r['epoch'] for r in run_log.read_metrics(str(tmp_path))] == [0, 1]
  assert lock_file.read_text() == ''  # released


def test_stale_lock_is_taken_over_with_a_notice(tmp_path, capsys):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from gear_jax.lock import WorkdirLock; '
       'WorkdirLock(sys.argv[1], "train").acquire(); print("held", flush=True); '
       'time.sleep(60)', str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  with pytest.raises(lock_lib.RunLocked, match=f'pid {holder.pid}'):
    lock_lib.WorkdirLock(str(tmp_path), 'train').acquire()
  holder.kill()
  holder.wait()
  with lock_lib.WorkdirLock(str(tmp_path), 'train'):
    err = capsys.readouterr().err
    assert f'taking over the lock of {tmp_path} left by pid {holder.pid}' in err
    assert 'not running' in err
    assert json.loads((tmp_path / lock_lib.LOCK_NAME).read_text())['pid'] == os.getpid()


# -- damaged checkpoints -----------------------------------------------------------------

@pytest.mark.slow
def test_damaged_latest_checkpoint(three_epochs, tmp_path):
  run, ref, args = three_epochs
  work = tmp_path / 'w'
  shutil.copytree(run, work)
  _damage(work, 30)
  out = run_module('gear_jax.evaluate', '--workdir', str(work), '--checkpoint', 'latest')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  lines = _error_lines(out.stderr)
  assert len(lines) == 2, out.stderr[-3000:]
  assert lines[0].startswith('error: checkpoint step 30 in ') and 'cannot be read: ' in lines[0]
  assert '--checkpoint best (step 20)' in lines[1]
  assert run_module('gear_jax.evaluate', '--workdir', str(work)).returncode == 0
  # resuming falls back to the best checkpoint, sets the damaged one aside, and ends
  # with the same record as a run that was never damaged
  out = run_module('gear_jax.train', *args, '--config.train.num_epochs=4', '--workdir',
                   str(work))
  assert out.returncode == 0, out.stderr[-3000:]
  warnings = [l for l in _error_lines(out.stderr) if l.startswith('warning:')]
  assert len(warnings) == 1 and 'checkpoint step 30' in warnings[0]
  assert 'resuming from step 20' in warnings[0]
  assert 'Exception ignored' not in out.stderr and 'Traceback' not in out.stderr
  assert [p.name.split('-')[0] for p in (work / 'damaged_checkpoints').iterdir()] == ['30']
  assert _metrics(work) == _metrics(ref)
  assert json.loads((work / 'summary.json').read_text())['best_val'] == \
      json.loads((ref / 'summary.json').read_text())['best_val']


def _raised_in(filename: str, error: str):
  """(type, value, traceback) of `error` raised by code that claims to be `filename`."""
  try:
    exec(compile(f'raise {error}', filename, 'exec'))
  except Exception as e:  # noqa: BLE001
    return type(e), e, e.__traceback__


def test_only_echoes_of_a_failed_read_are_dropped():
  from gear_jax.errors import is_failed_read_echo
  orbax = os.path.join('site-packages', 'orbax', 'checkpoint', '_src', 'serialization',
                       'serialization.py')
  loop = os.path.join('lib', 'python3', 'asyncio', 'base_events.py')
  assert is_failed_read_echo(*_raised_in(orbax, "ValueError('OUT_OF_RANGE')"))
  assert is_failed_read_echo(*_raised_in(loop, "RuntimeError('Event loop is closed')"))
  # anything else keeps being printed
  assert not is_failed_read_echo(*_raised_in('mine.py', "RuntimeError('Event loop is closed')"))
  assert not is_failed_read_echo(*_raised_in(loop, "RuntimeError('other')"))
  assert not is_failed_read_echo(*_raised_in('mine.py', "ValueError('OUT_OF_RANGE')"))
  # the same echo through asyncio's logger ("Task exception was never retrieved", when
  # a dropped read task is collected) is filtered by the command lines too
  import logging
  from gear_jax.cli import drop_failed_read_echoes
  def record(exc_info):
    return logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1,
                             'Task exception was never retrieved', None, exc_info)
  assert not drop_failed_read_echoes(record(_raised_in(orbax, "ValueError('OUT_OF_RANGE')")))
  assert drop_failed_read_echoes(record(_raised_in('mine.py', "ValueError('x')")))
  assert drop_failed_read_echoes(record(None))


@pytest.mark.slow
def test_no_readable_checkpoint_refuses(three_epochs, tmp_path):
  run, _, args = three_epochs
  work = tmp_path / 'w'
  shutil.copytree(run, work)
  _damage(work, 30)
  _damage(work, 20)
  before = sorted(p.relative_to(work) for p in work.rglob('*'))
  out = run_module('gear_jax.train', *args, '--config.train.num_epochs=4', '--workdir',
                   str(work))
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  lines = _error_lines(out.stderr)
  assert lines[0].startswith('error: no readable checkpoint in ')
  assert 'step 30' in lines[0] and 'step 20' in lines[0] and 'left as they are' in lines[1]
  after = sorted(p.relative_to(work) for p in work.rglob('*'))
  assert after == before  # nothing deleted or moved


# -- interrupts --------------------------------------------------------------------------

def _interrupt_lines(stderr: str) -> list[str]:
  """stderr of a clean stop without the signal handler's own notice."""
  return [l for l in _error_lines(stderr) if not l.startswith('SIG')]


def _resume_matches(args, workdir, ref) -> None:
  """Reruns the same command in `workdir`; it must end exactly like `ref`."""
  again = run_module('gear_jax.train', *args, '--workdir', str(workdir))
  assert again.returncode == 0, again.stderr[-3000:]
  assert _metrics(workdir) == _metrics(ref)
  summary, want = (json.loads((w / 'summary.json').read_text()) for w in (workdir, ref))
  assert {k: v for k, v in summary.items() if k != 'num_params'} == \
      {k: v for k, v in want.items() if k != 'num_params'}
  return again


def _fault(args, workdir, at_step, sig, *extra):
  return run_module('tests.fault_runner', '--at_step', str(at_step), '--signal', sig,
                    *extra, 'gear_jax.train', '--', *args, '--workdir', str(workdir))


@pytest.mark.slow
@pytest.mark.parametrize('sig, code', [('INT', 130), ('TERM', 143)])
def test_interrupt_stops_at_a_step_boundary(three_epochs, tmp_path, sig, code):
  _, ref, args = three_epochs
  args = [*args, '--config.train.num_epochs=4']
  out = _fault(args, tmp_path, 15, sig)  # in epoch 1 (10 steps an epoch)
  assert out.returncode == code, out.stderr[-3000:]
  # the stop saves the step it stopped at: the rerun continues inside the epoch
  assert _interrupt_lines(out.stderr) == [
      'interrupted at epoch 1 step 15; rerun the same command to resume from step 15'
  ], out.stderr[-3000:]
  assert not [p for p in (tmp_path / 'checkpoints').iterdir() if 'tmp' in p.name]
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [10, 15]
  record = json.loads((tmp_path / 'run.json').read_text())['latest_checkpoint']
  assert record == dict(step=15, epoch=1, micro_batch=5)
  if sig == 'TERM':  # the resume itself is the same after either signal
    again = _resume_matches(args, tmp_path, ref)
    assert ('resuming from checkpoint step 15 (in epoch 1 after 5 of its 10 '
            'micro-batches') in again.stdout


@pytest.mark.slow
def test_interrupt_during_evaluation(three_epochs, tmp_path):
  _, ref, args = three_epochs
  args = [*args, '--config.train.num_epochs=4']
  out = _fault(args, tmp_path, 5, 'INT', '--in_eval')  # 3 batches an evaluation
  assert out.returncode == 130, out.stderr[-3000:]
  assert _interrupt_lines(out.stderr) == [
      'interrupted at epoch 1 step 20; rerun the same command to resume from step 20'
  ], out.stderr[-3000:]
  assert [r['epoch'] for r in run_log.read_metrics(str(tmp_path))] == [0]
  _resume_matches(args, tmp_path, ref)


@pytest.mark.slow
def test_second_interrupt_exits_at_once(three_epochs, tmp_path):
  _, ref, args = three_epochs
  args = [*args, '--config.train.num_epochs=4']
  out = _fault(args, tmp_path, 25, 'INT', '--twice')
  assert out.returncode == 130
  assert 'second SIGINT: exiting now' in out.stderr and 'Traceback' not in out.stderr
  assert '25' not in os.listdir(tmp_path / 'checkpoints')
  _resume_matches(args, tmp_path, ref)


@pytest.mark.slow
def test_mid_epoch_checkpoints_resume_exactly(three_epochs, tmp_path):
  """train.checkpoint_every_steps saves inside epochs; a SIGKILL after such a save
  resumes from it (not the epoch start) and ends exactly like an uninterrupted run."""
  _, ref, args = three_epochs
  args = [*args, '--config.train.num_epochs=4', '--config.train.checkpoint_every_steps=3']
  out = _fault(args, tmp_path, 17, 'KILL', '--after_saves')  # saved 3, 6, 9, 10, 12, 15
  assert out.returncode == -9
  assert 'checkpoint: step 15 (epoch 1, micro-batch 5 of 10)' in out.stdout
  kept = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  assert kept == [10, 12, 15]  # the two newest and the best
  again = _resume_matches(args, tmp_path, ref)
  assert 'resuming from checkpoint step 15 (in epoch 1 after 5 of its 10' in again.stdout


@pytest.mark.slow
def test_damaged_newest_and_best_falls_back_to_the_previous(data_args, tmp_path):
  """A run whose newest checkpoint is also its best keeps the previous one beside it:
  when the newest is damaged, a resume falls back to it."""
  ref, work = tmp_path / 'ref', tmp_path / 'work'
  for workdir, epochs in ((ref, 4), (work, 3)):
    out = run_module('gear_jax.train', *data_args, f'--config.train.num_epochs={epochs}',
                     '--workdir', str(workdir))
    assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads((work / 'summary.json').read_text())['best_step'] == 30
  assert sorted(os.listdir(work / 'checkpoints')) == ['20', '30']
  _damage(work, 30)
  out = run_module('gear_jax.evaluate', '--workdir', str(work), '--checkpoint', 'latest')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert _error_lines(out.stderr)[0].startswith('error: checkpoint step 30 in ')
  out = run_module('gear_jax.train', *data_args, '--config.train.num_epochs=4',
                   '--workdir', str(work))
  assert out.returncode == 0, out.stderr[-3000:]
  warnings = [l for l in _error_lines(out.stderr) if l.startswith('warning:')]
  assert len(warnings) == 1 and 'checkpoint step 30' in warnings[0]
  assert 'resuming from step 20' in warnings[0]
  assert _metrics(work) == _metrics(ref)


@pytest.mark.slow
def test_interrupt_during_compilation(data_args, tmp_path):
  proc = subprocess.Popen([sys.executable, '-m', 'gear_jax.train', *data_args,
                           '--config.model.n_layer=2', '--workdir', str(tmp_path)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  for line in proc.stdout:  # the model line is printed right before compiling
    if line.startswith('model:'):
      break
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'Fatal' not in err
  assert 'interrupted at epoch 0 step 0; rerun the same command to start it again' in err
