"""Scale benchmark at the published ijcai shape: data path, train step and checkpoint.

  python scripts/bench_scale.py [--users 423423] [--items 874306]
      [--interactions 35800000] [--steps 4] [--data_dir data/bench_scale] [--json]
  python scripts/bench_scale.py --tiny --json      # a few thousand interactions (tests)

Generates an ijcai-shaped file in the reference format (``user item behavior
timestamp``) once, cached by its parameters under --data_dir and reused when present:

  items       Zipf popularity (rank ** -zipf_a) over shuffled ids; every item occurs at
              least once, so the catalog after preprocessing is exactly --items
  lengths     log-normal per user, at least 3 (so min_uc = 3 keeps every user), scaled
              to sum to exactly --interactions (mean about 85 at the ijcai shape)
  behaviors   pv / fav / cart / buy with ijcai-like shares; each user's last
              interaction is a buy (every user has a validation case); half of the
              fav / cart / buy events are on the item of the interaction before
  timestamps  strictly increasing within a user (log-normal gaps: minutes to days)

Generation is vectorised numpy (no per-row Python), written with
`gear_jax.data.synthetic.write_tsv`, in a child process. Then each phase runs in a
fresh Python process, so that its peak RSS is its own (/proc/self/status VmHWM, which,
unlike ru_maxrss on Linux, does not start from the parent's peak), under
configs/ijcai.py (batch 32, grad_accum 4, L 50, d_model 32, 4 upper layers) and with
the host allocator set as the trainer sets it:

  preprocess    parse + GEAR preprocessing of the file with no cache (time, peak RSS,
                the counts after min_uc), then the cache file written for the next phase
  cached start  the data set loaded from the preprocessing cache, as a resumed or
                repeated run starts
  train         the train step compiled ahead of time as the trainer compiles it
                (`trainer.jit_train_step` on `parallel.abstract_batch`), one warm-up
                step, then --steps micro-batches end to end (grain batch, device put,
                step, block): micro-batches/s and seconds each
  checkpoint    one save of the full training state (params, Adam state, step, RNG
                key and the grain iterator) through `gear_jax.checkpoint.CheckpointStore`:
                the blocking part of `save`, the total until `wait()` returns (committed)
                and the size on disk

Prints a table and, last, one JSON object (--json: the JSON object only). The checkpoint
is left in <data_dir>/ckpt-<shape>/checkpoints/<step> (replaced by the next run).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'ijcai.py')
IJCAI = dict(users=423_423, items=874_306, interactions=35_800_000)
TINY = dict(users=200, items=1500, interactions=6000)
# ijcai-like behavior shares (pv, fav, cart, buy); the forced last buys count in `buy`
SHARES = (0.83, 0.05, 0.04, 0.08)
GENERATOR_VERSION = 1
DATA_ARGS = ('users', 'items', 'interactions', 'seed', 'zipf_a', 'len_sigma', 'data_dir')
START_TIME = 1_500_000_000
_DAY = 86_400


def peak_rss_mb() -> float:
  """This process's peak resident memory in MB: VmHWM where Linux gives it (its own
  address space's high-water mark, which starts afresh at exec), else ru_maxrss
  (on Linux that one keeps the parent's peak at the time of the fork)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------ the data file

def generate_columns(num_users: int, num_items: int, num_interactions: int, *,
                     seed: int = 0, zipf_a: float = 1.0, len_sigma: float = 1.1,
                     shares=SHARES) -> dict[str, np.ndarray]:
  """Columns of an ijcai-shaped data set, sorted by user then time (see the module
  docstring): user int64 1..U, item int64 1..I, behavior uint8 codes into
  `synthetic.BEHAVIORS`, timestamp int64."""
  from gear_jax.data import synthetic
  u, n_items, n = int(num_users), int(num_items), int(num_interactions)
  if u < 1 or n < 3 * u or not 1 <= n_items <= n:
    raise SystemExit(f'need users >= 1, interactions >= 3 x users and 1 <= items <= '
                     f'interactions; got {u:,} users, {n_items:,} items, {n:,} '
                     'interactions')
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CA1E]))
  # lengths: 3 + a log-normal share of the rest, rounded so that they sum to n exactly
  w = rng.lognormal(0.0, len_sigma, u)
  raw = (n - 3 * u) * w / w.sum()
  lengths = 3 + np.floor(raw).astype(np.int64)
  lengths[np.argsort(np.floor(raw) - raw, kind='stable')[:n - int(lengths.sum())]] += 1
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  first, last = offsets[:-1], offsets[1:] - 1
  user = np.repeat(np.arange(1, u + 1, dtype=np.int64), lengths)
  # behaviors: the last of each user is a buy; the other buys make up the rest
  p = np.asarray(shares, np.float64) / np.sum(shares)
  free = p.copy()
  free[synthetic.BUY] = max(p[synthetic.BUY] * n - u, 0.0) / max(n - u, 1)
  free /= free.sum()
  behavior = np.minimum(np.searchsorted(np.cumsum(free), rng.random(n), side='right'),
                        len(free) - 1).astype(np.uint8)
  behavior[last] = synthetic.BUY
  # items: Zipf over popularity ranks, ranks mapped to shuffled ids
  cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -float(zipf_a))
  cdf /= cdf[-1]
  ids = rng.permutation(n_items).astype(np.int64) + 1
  item = ids[np.minimum(np.searchsorted(cdf, rng.random(n), side='right'), n_items - 1)]
  del cdf
  # half of the fav / cart / buy events act on the item of the interaction before
  same = (behavior != synthetic.PV) & (rng.random(n) < 0.5)
  same[first] = False
  idx = np.flatnonzero(same)
  item[idx] = item[idx - 1]
  # every item occurs at least once (at random positions)
  item[rng.choice(n, n_items, replace=False)] = np.arange(1, n_items + 1)
  # timestamps: user start within 180 days, gaps of minutes to days, strictly increasing
  gaps = np.clip(np.rint(300.0 * np.exp(2.0 * rng.standard_normal(n))), 1, 30 * _DAY
                 ).astype(np.int64)
  gaps[first] = 0
  cum = np.cumsum(gaps)
  start = START_TIME + (rng.random(u) * 180 * _DAY).astype(np.int64)
  timestamp = cum + np.repeat(start - cum[first], lengths)
  return dict(user=user, item=item, behavior=behavior, timestamp=timestamp)


def data_params(args) -> dict:
  return dict(users=args.users, items=args.items, interactions=args.interactions,
              seed=args.seed, zipf_a=args.zipf_a, len_sigma=args.len_sigma,
              shares=list(SHARES), version=GENERATOR_VERSION)


def data_path(args) -> tuple[str, str]:
  """The file and its sidecar (the parameters and the generated counts)."""
  params = data_params(args)
  tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
  base = os.path.join(args.data_dir, f'scale-u{args.users}-i{args.items}-'
                      f'n{args.interactions}-s{args.seed}-{tag}.tsv')
  return base, base + '.json'


def ensure_data(args) -> dict:
  """Generates the file unless a complete one with the same parameters is there."""
  from gear_jax.data import synthetic
  path, sidecar = data_path(args)
  if os.path.isfile(path) and os.path.isfile(sidecar):
    with open(sidecar) as f:
      info = json.load(f)
    if info.get('params') == data_params(args) and info.get('bytes') == os.path.getsize(
        path):
      return dict(info, path=path, reused=True)
  os.makedirs(args.data_dir, exist_ok=True)
  t0 = time.perf_counter()
  cols = generate_columns(args.users, args.items, args.interactions, seed=args.seed,
                          zipf_a=args.zipf_a, len_sigma=args.len_sigma)
  generate_s = time.perf_counter() - t0
  synthetic.write_tsv(path, cols)
  total_s = time.perf_counter() - t0
  lengths = np.bincount(cols['user'])[1:]
  kept = lengths >= 3  # min_uc of configs/ijcai.py (the defaults)
  rows = kept[cols['user'] - 1]
  counts = np.bincount(cols['behavior'][rows], minlength=len(synthetic.BEHAVIORS))
  info = dict(params=data_params(args), bytes=os.path.getsize(path),
              users=int(kept.sum()),
              items=int(np.count_nonzero(np.bincount(cols['item'][rows]))),
              interactions=int(rows.sum()),
              behaviors={b: int(c) for b, c in zip(synthetic.BEHAVIORS, counts)},
              seq_len=dict(min=int(lengths.min()), mean=round(float(lengths.mean()), 2),
                           median=float(np.median(lengths)), max=int(lengths.max())),
              generate_s=round(generate_s, 3), write_s=round(total_s - generate_s, 3))
  with open(sidecar + '.tmp', 'w') as f:
    json.dump(info, f, indent=1)
  os.replace(sidecar + '.tmp', sidecar)
  return dict(info, path=path, reused=False)


# ------------------------------------------------------------------------ the phases

def load_config(path: str, cache_dir: str):
  spec = importlib.util.spec_from_file_location('bench_scale_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.path = path
  config.data.cache = True
  config.data.cache_dir = cache_dir
  return config


def phase_preprocess(path: str, cache_dir: str) -> dict:
  """A fresh parse + preprocessing with no cache; then the cache file is written."""
  from gear_jax import hostalloc
  hostalloc.configure()  # as a training process does before it loads data
  from gear_jax.data import preprocess
  config = load_config(path, cache_dir)
  settings = preprocess.settings_from_config(config.data)
  fmt = preprocess.format_from_config(config.data)
  rss_before = peak_rss_mb()
  t0 = time.perf_counter()
  data, info = preprocess.load(path, fmt, settings, cache_dir='')
  seconds = time.perf_counter() - t0
  peak = peak_rss_mb()
  out = dict(seconds=round(seconds, 4), parse_s=round(info.parse_seconds, 4),
             peak_rss_mb=round(peak, 1), rss_before_mb=round(rss_before, 1),
             users=data.num_users, items=data.num_items,
             interactions=data.num_interactions, val_users=int(len(data.val_user)),
             train_interactions=int(data.train_len.sum()))
  # the cache file, under the name preprocess.load looks for (data.key is its key)
  cache_path = os.path.join(cache_dir, f'data-{data.key}.npz')
  t0 = time.perf_counter()
  if not os.path.isfile(cache_path):
    os.makedirs(cache_dir, exist_ok=True)
    preprocess.atomic_save_npz(cache_path, data.to_arrays())
    out['cache_write_s'] = round(time.perf_counter() - t0, 4)
  out['cache_mb'] = round(os.path.getsize(cache_path) / 2**20, 1)
  return out


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def phase_train(path: str, cache_dir: str, workdir: str, num_steps: int) -> dict:
  """Cached load, the compiled train step, --steps micro-batches, one checkpoint."""
  t_start = time.perf_counter()
  from gear_jax import backend, defaults, hostalloc
  hostalloc.configure()  # before XLA starts its threads, as train_and_evaluate does
  config = load_config(path, cache_dir)
  defaults.validate_config(config)
  backend.configure_determinism(bool(config.train.deterministic_ops))
  import jax
  from gear_jax import checkpoint as ckpt_lib
  from gear_jax import parallel, steps, trainer
  from gear_jax.data import load_dataset
  from gear_jax.data import pipeline as pipeline_lib
  from gear_jax.models import layers, registry

  t0 = time.perf_counter()
  data, info = load_dataset(config.data)
  cached = dict(seconds=round(time.perf_counter() - t0, 4), from_cache=info.from_cache,
                peak_rss_mb=round(peak_rss_mb(), 1))
  if not info.from_cache:  # no cache yet (the preprocess phase writes it): now there is
    t0 = time.perf_counter()
    data, info = load_dataset(config.data)
    cached.update(seconds=round(time.perf_counter() - t0, 4), from_cache=info.from_cache)

  # as trainer._build does: mesh, batches, model, state, the step compiled ahead of time
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.model))
  seed, batch_size = int(config.seed), int(config.train.batch_size)
  max_len = int(config.data.max_len)
  shard_items = bool(config.mesh.shard_items)
  pidx, pcount = parallel.process_slice()
  train_batches = pipeline_lib.TrainBatches(data, batch_size, max_len, seed,
                                            process_index=pidx, process_count=pcount)
  model = registry.build(data.num_items, data.num_behaviors, config.model,
                         config.model.precision,
                         parallel.table_rows(data.num_items, mesh, shard_items))
  tx = steps.make_optimizer(float(config.train.lr), float(config.train.weight_decay),
                            int(config.train.grad_accum))
  t0 = time.perf_counter()
  state = steps.create_state(model, tx, mesh, seed=seed, max_len=max_len,
                             shard_items=shard_items)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  batch = parallel.abstract_batch(train_batches(0), mesh, pcount)
  jitted = trainer.jit_train_step(config, model, tx, mesh, state, batch)
  t0 = time.perf_counter()
  train_step = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  iterator = iter(pipeline_lib.train_pipeline(train_batches,
                                              num_threads=int(config.data.threads)))
  startup_s = time.perf_counter() - t_start

  t0 = time.perf_counter()
  state, aux = train_step(state, parallel.put_batch(next(iterator), mesh))  # warm-up
  jax.block_until_ready(aux['loss'])
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(num_steps):
    t0 = time.perf_counter()
    state, aux = train_step(state, parallel.put_batch(next(iterator), mesh))
    jax.block_until_ready(aux['loss'])
    times.append(time.perf_counter() - t0)
  loss = float(aux['loss'])
  train = dict(compile_s=round(compile_s, 3), init_state_s=round(init_s, 3),
               startup_s=round(startup_s, 2), warmup_step_s=round(warmup_s, 3),
               steps=num_steps, step_s=round(statistics.median(times), 4),
               step_s_min=round(min(times), 4), step_s_max=round(max(times), 4),
               micro_batches_per_s=round(num_steps / sum(times), 4),
               sequences_per_s=round(num_steps * batch_size / sum(times), 1),
               loss=loss, batch_size=batch_size,
               grad_accum=int(config.train.grad_accum), max_len=max_len,
               d_model=model.d_model, n_layer=model.n_layer, kernels=model.kernels,
               params=layers.count_params(state.params, data.num_items),
               loss_memory_mb=trainer.loss_budget(config, mesh)[0],
               batches_per_epoch=train_batches.batches_per_epoch,
               peak_rss_mb=round(peak_rss_mb(), 1))

  # one checkpoint of the full training state, as the trainer saves it
  shutil.rmtree(workdir, ignore_errors=True)
  step = int(parallel.to_host(state.step))
  store = ckpt_lib.CheckpointStore(workdir, num_items=data.num_items, mesh=mesh)
  meta = dict(epoch=0, step=step, early_stopping=trainer.EarlyStopping(
      int(config.train.patience)).state(), metrics=None, config=config.to_dict(),
      data_key=data.key, num_items=data.num_items, num_behaviors=data.num_behaviors,
      bench='scripts/bench_scale.py')
  t0 = time.perf_counter()
  store.save(step, params=state.params,
             train={'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng},
             iterator=iterator, meta=meta, monitor=0.0)
  blocking_s = time.perf_counter() - t0
  store.wait()
  total_s = time.perf_counter() - t0
  store.close()
  step_dir = os.path.join(workdir, 'checkpoints', str(step))
  nbytes = _dir_bytes(step_dir)
  arrays = sum(x.nbytes for x in jax.tree_util.tree_leaves(
      (state.params, state.opt_state)))
  checkpoint = dict(blocking_s=round(blocking_s, 4), total_s=round(total_s, 4),
                    size_mb=round(nbytes / 2**20, 1), size_bytes=nbytes,
                    state_mb=round(arrays / 2**20, 1), step=step, dir=step_dir,
                    items=sorted(n for n in os.listdir(step_dir)
                                 if os.path.isdir(os.path.join(step_dir, n))))
  return dict(cached_start=cached, train=train, checkpoint=checkpoint,
              peak_rss_mb=round(peak_rss_mb(), 1),
              backend=jax.default_backend(), device=str(jax.devices()[0].device_kind))


def run_phase(args, phase: str, **kwargs) -> dict:
  """Runs one phase in a fresh Python process; returns its JSON."""
  cmd = [sys.executable, os.path.abspath(__file__), '--_phase', phase,
         '--_phase_args', json.dumps(kwargs)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    raise SystemExit(f'phase {phase} failed (exit {proc.returncode}):\n'
                     f'{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ main

def table(r: dict) -> str:
  d, p, c, t, k = (r['data'], r['preprocess'], r['cached_start'], r['train'],
                   r['checkpoint'])
  gen = ('reused' if d['reused'] else
         f'generated in {d["generate_s"]:.1f} s + written in {d["write_s"]:.1f} s')
  lines = [
      f'{d["path"]}: {d["users"]:,} users, {d["items"]:,} items, '
      f'{d["interactions"]:,} interactions ({d["bytes"] / 2**20:,.0f} MB; {gen})',
      f'configs/ijcai.py: batch {t["batch_size"]} x {t["max_len"]}, grad_accum '
      f'{t["grad_accum"]}, d_model {t["d_model"]}, {t["n_layer"]} upper layers, '
      f'{t["params"]:,} parameters, on {r["device"]} ({r["backend"]})']
  rows = [('preprocess, no cache (s)', f'{p["seconds"]:.1f}'),
          ('  of which parse (s)', f'{p["parse_s"]:.1f}'),
          ('  peak RSS (MB)', f'{p["peak_rss_mb"]:,.0f}'),
          ('  users / items after min_uc', f'{p["users"]:,} / {p["items"]:,}'),
          ('  validation cases', f'{p["val_users"]:,}'),
          ('cached start: load from cache (s)', f'{c["seconds"]:.2f}'),
          ('compile of the train step (s)', f'{t["compile_s"]:.1f}'),
          ('process start to compiled step (s)', f'{t["startup_s"]:.1f}'),
          (f'train step, median of {t["steps"]} (s)', f'{t["step_s"]:.3f}'),
          ('micro-batches / s', f'{t["micro_batches_per_s"]:.3f}'),
          ('train process peak RSS (MB)', f'{t["peak_rss_mb"]:,.0f}'),
          ('checkpoint save, blocking (s)', f'{k["blocking_s"]:.2f}'),
          ('checkpoint save, until committed (s)', f'{k["total_s"]:.2f}'),
          ('checkpoint size on disk (MB)', f'{k["size_mb"]:,.0f}')]
  lines += [f'  {name:<40}{value:>22}' for name, value in rows]
  lines.append(f'  load average {r["loadavg"]["start"]} at start, '
               f'{r["loadavg"]["end"]} at end ({os.cpu_count()} CPUs)')
  return '\n'.join(lines)


def resolve(args) -> argparse.Namespace:
  """Fills in the shape (--tiny or the ijcai one) and the number of steps."""
  shape = TINY if args.tiny else IJCAI
  for key, value in shape.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.steps is None:
    args.steps = 2 if args.tiny else 4
  args.data_dir = os.path.abspath(args.data_dir)
  return args


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--users', type=int, default=None)
  parser.add_argument('--items', type=int, default=None)
  parser.add_argument('--interactions', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None,
                      help='timed micro-batches after one warm-up (default 4, tiny 2)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--zipf_a', type=float, default=1.0)
  parser.add_argument('--len_sigma', type=float, default=1.1)
  parser.add_argument('--data_dir', default=os.path.join(REPO, 'data', 'bench_scale'))
  parser.add_argument('--tiny', action='store_true',
                      help=f'{TINY["interactions"]:,} interactions (for the test)')
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--_phase', default='', help=argparse.SUPPRESS)
  parser.add_argument('--_phase_args', default='{}', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._phase:
    if args._phase == 'data':  # in a child too, so that this process stays small
      print(json.dumps(ensure_data(argparse.Namespace(**json.loads(args._phase_args)))))
      return
    fn = {'preprocess': phase_preprocess, 'train': phase_train}[args._phase]
    print(json.dumps(fn(**json.loads(args._phase_args))))
    return
  args = resolve(args)

  load_start = os.getloadavg()
  t0 = time.perf_counter()
  data = run_phase(args, 'data', **{k: getattr(args, k) for k in DATA_ARGS})
  path = data['path']
  cache_dir = os.path.join(args.data_dir, 'cache')
  prep = run_phase(args, 'preprocess', path=path, cache_dir=cache_dir)
  workdir = os.path.join(args.data_dir, f'ckpt-u{args.users}-i{args.items}-'
                         f'n{args.interactions}')
  train = run_phase(args, 'train', path=path, cache_dir=cache_dir, workdir=workdir,
                    num_steps=args.steps)
  result = dict(
      date=time.strftime('%Y-%m-%d'), command=' '.join(['python'] + sys.argv),
      host=dict(cpus=os.cpu_count(), machine=platform.machine(),
                processor=platform.processor()),
      loadavg=dict(start=[round(x, 2) for x in load_start],
                   end=[round(x, 2) for x in os.getloadavg()]),
      data=data, preprocess=prep, **train, wall_s=round(time.perf_counter() - t0, 1))
  if not args.json:
    print(table(result))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
