"""Seeds x small grids of training runs, one after another (the library behind
``python -m gear_jax.sweep``, which describes the layout and the resume rule)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

from gear_jax.errors import ConfigError, UserError


def parse_sets(specs: list[str]) -> list[tuple[str, list[str]]]:
  """['model.d_model=32,64'] -> [('model.d_model', ['32', '64'])]."""
  out = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    items = [v.strip() for v in values.split(',') if v.strip()]
    if not sep or not key.strip() or not items:
      raise ConfigError(f'--set {spec!r}: expected KEY=V1,V2,...', field='--set',
                        hint='e.g. --set model.d_model=32,64')
    out.append((key.strip(), items))
  return out


def run_name(settings: list[tuple[str, str]]) -> str:
  """A directory name from settings: the last part of each key, '=' and the value."""
  return ','.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in settings).replace('/', '_')


def combinations(sets: list[tuple[str, list[str]]], seeds: list[str]
                 ) -> list[list[tuple[str, str]]]:
  keys = [k for k, _ in sets] + ['seed']
  grids = [v for _, v in sets] + [seeds]
  return [list(zip(keys, values)) for values in itertools.product(*grids)]


def flag_value(v) -> str:
  """A parsed override as ml_collections parses it back from a flag."""
  return str(tuple(v)) if isinstance(v, (list, tuple)) else str(v)


def run_all(config_file: str, workdir: str, runs: list[list[tuple[str, str]]],
            passthrough: list[str]) -> str:
  """Trains every run of `runs` not finished yet (``python -m gear_jax.train`` in
  <workdir>/<run_name>), then writes the comparison; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  for i, settings in enumerate(runs, 1):
    run_dir = os.path.join(workdir, run_name(settings))
    if os.path.exists(os.path.join(run_dir, 'summary.json')):
      print(f'[{i}/{len(runs)}] {run_dir}: finished, skipped', file=sys.stderr, flush=True)
      continue
    how = 'resuming' if os.path.isdir(os.path.join(run_dir, 'checkpoints')) else 'starting'
    print(f'[{i}/{len(runs)}] {run_dir}: {how}', file=sys.stderr, flush=True)
    cmd = [sys.executable, '-m', 'gear_jax.train', '--config', config_file,
           '--workdir', run_dir, *passthrough,
           *[f'--config.{k}={v}' for k, v in settings]]
    code = subprocess.call(cmd)
    if code:
      raise UserError(f'run {run_dir} failed (exit {code}); its output is above',
                      hint='fix it and run the same sweep command again: finished runs '
                      'are skipped, this one resumes')
  from gear_jax import reporting
  path = reporting.write_comparison(
      [os.path.join(workdir, run_name(s)) for s in runs], workdir)
  print(f'sweep: {len(runs)} runs in {time.perf_counter() - start:.0f}s; wrote {path}',
        file=sys.stderr, flush=True)
  return path
