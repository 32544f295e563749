"""Studies run through ``python -m gear_jax.tune`` on the tiny test config: a killed
study finished by a rerun, two workers sharing one SQLite study, a pruned trial, the
study's report, and best.json's command reproducing the best value exactly."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, TEST_CONFIG, run_module

pytestmark = pytest.mark.slow  # each test trains several small runs


@pytest.fixture(scope='module')
def data_args(tmp_path_factory):
  from gear_jax.data import synthetic
  d = tmp_path_factory.mktemp('tdata')
  synthetic.write_tsv(d / 'syn.txt', synthetic.generate(300, 150, seed=0))
  return [f'--config.data.path={d / "syn.txt"}', f'--config.data.cache_dir={d / "cache"}']


def _args(workdir, data_args, trials, *extra):
  return ['--config', TEST_CONFIG, '--workdir', str(workdir), '--trials', str(trials),
          '--config.train.num_epochs=3', *data_args, *extra]


def _trials(workdir):
  import optuna
  study = optuna.load_study(study_name=os.path.basename(workdir),
                            storage=f'sqlite:///{workdir}/study.db')
  return study.get_trials(deepcopy=False)


def _started(stderr: str) -> list[int]:
  return [int(n) for n in re.findall(r'^trial (\d+): starting', stderr, re.M)]


def test_a_killed_study_is_finished_by_the_same_command(tmp_path, data_args):
  workdir = tmp_path / 'tune'
  args = _args(workdir, data_args, 2, '--config.train.checkpoint_every_steps=4',
               '--config.train.num_epochs=2')
  # SIGKILL in the second trial, at its step 15 (after the save of step 12 committed)
  killed = run_module('tests.fault_runner', '--run', '2', '--at_step', '15',
                      '--after_saves', 'gear_jax.tune', '--', *args)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert _started(killed.stderr) == [0, 1]
  first = (workdir / 'trial_0' / 'metrics.jsonl').read_bytes()
  again = run_module('gear_jax.tune', *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'trial 1: resuming in' in again.stderr
  assert 'resuming from checkpoint step 12 (in epoch 1' in again.stdout
  assert _started(again.stderr) == []  # trial 0 is not run again, nor a third one
  assert (workdir / 'trial_0' / 'metrics.jsonl').read_bytes() == first
  trials = _trials(workdir)
  assert [t.number for t in trials] == [0, 1]
  assert all(t.state.name in ('COMPLETE', 'PRUNED') for t in trials)
  # best.json's command trains the best trial again to exactly its value
  best = json.loads((workdir / 'best.json').read_text())
  assert best['number'] in (0, 1) and best['params'] == trials[best['number']].params
  cmd = shlex.split(best['command'])
  assert cmd[:3] == ['python', '-m', 'gear_jax.train']
  out = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads((workdir / f"best_trial_{best['number']}" / 'summary.json').read_text())
  assert summary['best'] == best['value']


def test_two_workers_share_one_study(tmp_path, data_args):
  workdir = tmp_path / 'shared'
  args = _args(workdir, data_args, 6, '--config.train.num_epochs=1')
  procs = [subprocess.Popen([sys.executable, '-m', 'gear_jax.tune', *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  started = [_started(err) for _, err in outs]
  assert sorted(started[0] + started[1]) == [0, 1, 2, 3, 4, 5], started
  assert started[0] and started[1]  # both worked
  trials = _trials(workdir)
  assert len(trials) == 6 and all(t.state.name in ('COMPLETE', 'PRUNED') for t in trials)
  settings = {tuple(sorted(t.params.items())) for t in trials}
  assert len(settings) == 6
  for t in trials:  # every trial is an ordinary run directory
    assert (workdir / f'trial_{t.number}' / 'summary.json').exists()
  # the study's report on demand
  (workdir / 'report.md').unlink()
  out = run_module('gear_jax.report', '--workdir', str(workdir))
  assert out.returncode == 0, out.stderr[-2000:]
  report = (workdir / 'report.md').read_text()
  rows = [ln for ln in report.splitlines() if re.match(r'\| \d+ \| (complete|pruned) \|', ln)]
  assert len(rows) == 6
  for png in ('tune_history.png', 'tune_importance.png'):
    assert (workdir / png).stat().st_size > 1000


def test_a_pruned_trial_stops_at_an_epoch_with_its_checkpoint(tmp_path, data_args):
  """Grid order (seed 0) trains lr 0.01 first; lr 1e-7 is then below its epoch-0 value."""
  workdir = tmp_path / 'prune'
  out = run_module('gear_jax.tune', *_args(
      workdir, data_args, 2, '--sampler', 'grid',
      "--config.tune.space=('train.lr: choice(1e-07, 0.01)',)",
      '--config.tune.startup_trials=1', '--config.tune.warmup_epochs=0'))
  assert out.returncode == 0, out.stderr[-2000:]
  assert re.search(r'^trial 1 pruned after 1 epochs: lr=1e-07 -> val/NDCG@10 0\.\d+; '
                   r'best 0\.\d+ \(trial 0\); 2/2 trials', out.stderr, re.M), out.stderr
  trials = _trials(workdir)
  assert [t.state.name for t in trials] == ['COMPLETE', 'PRUNED']
  summary = json.loads((workdir / 'trial_1' / 'summary.json').read_text())
  assert summary['stopped_by'].startswith('pruned by the median pruner')
  assert summary['epochs_run'] == 1
  # its checkpoint of epoch 0 is kept (and is its best: evaluate, recommend use it)
  assert summary['best_step'] == 10
  assert '10' in os.listdir(workdir / 'trial_1' / 'checkpoints')
