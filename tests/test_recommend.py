"""Recommendations: the recommend CLI, the Recommender API, export and serving.

One tiny run is trained through the CLI on a data file whose ids are text with leading
zeros ('007' and '7' are two users, items '0001'..'0150'); every test reads it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import K_FULL, run_module, shop_run


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, data path, raw columns as text) of a trained tiny run."""
  return shop_run(tmp_path_factory.mktemp('rec'), '--config.eval.other_protocol=True')


def _recommend(run, *flags):
  return run_module('gear_jax.recommend', '--workdir', run['workdir'], *flags)


def _read_csv(path) -> dict[str, list[tuple[int, str, float]]]:
  lines = open(path).read().splitlines()
  assert lines[0] == 'user,rank,item,score'
  out = {}
  for line in lines[1:]:
    user, rank, item, score = line.split(',')
    out.setdefault(user, []).append((int(rank), item, float(score)))
  return out


def _history(run, user: str, behavior: str | None = None) -> set[str]:
  return {i for u, i, b in zip(run['users'], run['items'], run['behaviors'])
          if u == user and (behavior is None or b == behavior)}


@pytest.mark.slow
def test_cli_raw_ids_exclusions_and_unknown_users(run, tmp_path):
  """Text ids keep their leading zeros ('007' and '7' are different users); --exclude
  seen / target never return an excluded item; unknown ids are warned about; a user
  below min_uc is scored."""
  users = ['007', '7', '0007', '150', 'nobody', 'short']
  users_file = tmp_path / 'users.txt'
  users_file.write_text('\n'.join(users) + '\n\n')
  seen = tmp_path / 'seen.csv'
  out = _recommend(run, '--users', str(users_file), '--k', '20', '--exclude', 'seen',
                   '--output', str(seen))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 user ids are not in" in out.stderr and "'0007', 'nobody'" in out.stderr
  assert 'recommended top 20 of 150 items to 4 users (80 rows)' in out.stderr
  recs = _read_csv(seen)
  assert list(recs) == ['007', '7', '150', 'short']  # the order asked for
  assert [r for r, _, _ in recs['007']] == list(range(1, 21))
  assert recs['007'] != recs['7']
  for user, rows in recs.items():
    scores = [s for _, _, s in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(len(i) == 4 and i.startswith('0') for _, i, _ in rows)  # '0042', not 42
    assert not {i for _, i, _ in rows} & _history(run, user), user
  bought = tmp_path / 'bought.jsonl'
  out = _recommend(run, '--user', '007,7', '--k', str(K_FULL), '--exclude', 'target',
                   '--output', str(bought))
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in open(bought)]
  assert {r['user'] for r in rows} == {'007', '7'}
  assert all(isinstance(r['item'], str) for r in rows)
  for user in ('007', '7'):
    got = [r['item'] for r in rows if r['user'] == user]
    assert not set(got) & _history(run, user, 'buy')
    assert set(got) == set(run['items']) - _history(run, user, 'buy')  # all the rest


@pytest.mark.slow
def test_history_file_equals_known_user_and_bad_history(run, tmp_path):
  """--history for a known user (here as CSV with a header and milliseconds, read
  through --config.data.*) gives the list recommending that user by id gives, also
  with --at; a bad line is reported with file:line:field."""
  lines = ['shopper;product;event;ms']
  for u, i, b, t in zip(run['users'], run['items'], run['behaviors'], run['stamps']):
    if u in ('007', '120'):
      lines.append(f'{u};{i};{b};{t * 1000}')
  lines.append('007;9999;pv;1501137700000')  # an item the model does not know
  hist = tmp_path / 'hist.csv'
  hist.write_text('\n'.join(lines) + '\n')
  by_id, by_file = tmp_path / 'by_id.csv', tmp_path / 'by_file.csv'
  at = '2030-01-01T00:00:00'
  out = _recommend(run, '--user', '120,007', '--k', '15', '--at', at, '--output',
                   str(by_id))
  assert out.returncode == 0, out.stderr[-3000:]
  out = _recommend(run, '--history', str(hist), '--k', '15', '--at', at, '--output',
                   str(by_file), '--config.data.format=csv', "--config.data.csv.delimiter=;",
                   '--config.data.csv.columns.user=shopper',
                   '--config.data.csv.columns.item=product',
                   '--config.data.csv.columns.behavior=event',
                   '--config.data.csv.columns.timestamp=ms',
                   '--config.data.csv.timestamp_unit=ms')
  assert out.returncode == 0, out.stderr[-3000:]
  assert '1 interactions with items the model does not know' in out.stderr
  a, b = _read_csv(by_id), _read_csv(by_file)
  assert set(a) == set(b) == {'007', '120'}
  for user in a:
    assert [i for _, i, _ in a[user]] == [i for _, i, _ in b[user]]
    np.testing.assert_allclose([s for *_, s in a[user]], [s for *_, s in b[user]],
                               rtol=1e-6)
  bad = tmp_path / 'bad.tsv'
  bad.write_text('u1\t0001\tpv\t1501137700\nu1\t0002\tpeek\t1501137800\n')
  out = _recommend(run, '--history', str(bad))
  assert out.returncode == 2
  assert f'{bad}:2' in out.stderr and 'behavior' in out.stderr and "'peek'" in out.stderr
  assert 'Traceback' not in out.stderr


@pytest.mark.slow
def test_bad_input_is_refused_before_work(run, tmp_path):
  """Empty users file, unwritable output, --k beyond the catalogue, a workdir without
  checkpoints, a checkpoint of other data: clear errors (exit 2) or notices."""
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n  \n')
  out = _recommend(run, '--users', str(empty))
  assert out.returncode == 2 and 'holds no user ids' in out.stderr
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  out = _recommend(run, '--user', '007', '--output', str(blocker / 'recs.csv'))
  assert out.returncode == 2 and 'cannot write --output' in out.stderr
  assert 'Traceback' not in out.stderr
  out = _recommend(run, '--user', '007', '--output', str(tmp_path / 'recs.txt'))
  assert out.returncode == 2 and "unknown extension '.txt'" in out.stderr
  out = _recommend(run, '--user', '007', '--k', '500')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'notice: k=500 is larger than the catalogue; returning all 150' in out.stderr
  assert len(out.stdout.splitlines()) == 1 + K_FULL
  nockpt = tmp_path / 'nockpt'
  nockpt.mkdir()
  (nockpt / 'config.json').write_text(open(os.path.join(run['workdir'],
                                                         'config.json')).read())
  out = run_module('gear_jax.recommend', '--workdir', str(nockpt), '--user', '007')
  assert out.returncode == 2 and 'no checkpoints' in out.stderr
  other = tmp_path / 'other.tsv'  # the same items, one timestamp changed
  lines = open(run['data']).read().splitlines()
  u, i, b, t = lines[5].split('\t')
  lines[5] = '\t'.join([u, i, b, str(int(t) + 1)])
  other.write_text('\n'.join(lines) + '\n')
  out = _recommend(run, '--user', '007', f'--config.data.path={other}')
  assert out.returncode == 2 and 'was trained on other data' in out.stderr
  assert 'Traceback' not in out.stderr


@pytest.mark.slow
def test_full_scores_rank_equals_full_protocol_evaluation(run):
  """For every validation user: the history cut just before the validation case and
  `at` = its time give the held-out item the rank that full-ranking evaluation gives
  it; NDCG@10 over those ranks equals `evaluate`'s."""
  import jax
  from gear_jax import Recommender, evaluator, retrieval
  from gear_jax.data import pipeline
  from gear_jax.serving import Histories
  rec = Recommender.load(run['workdir'])
  data, known = rec.data, rec.known_histories()
  assert rec.vocab.num_items == K_FULL
  # the validation cases as histories: everything before the held-out buy
  rows = np.searchsorted(known.users, data.user_ids[data.val_user])
  assert np.all(known.users[rows] == data.user_ids[data.val_user])
  before = data.val_pos - data.offsets[data.val_user]  # interactions before the case
  cut = known.take(rows)
  held = cut.offsets[:-1] + before
  at = cut.timestamps[held]
  target = cut.items[held]
  keep = np.arange(len(cut.items)) < np.repeat(held, cut.lengths)
  user_of = np.repeat(np.arange(len(cut)), cut.lengths)
  counts = np.bincount(user_of[keep], minlength=len(cut))
  offsets = np.concatenate([[0], np.cumsum(counts)])
  cut = Histories(users=cut.users, offsets=offsets, items=cut.items[keep],
                  behaviors=cut.behaviors[keep], timestamps=cut.timestamps[keep],
                  unknown=cut.unknown)
  recs = rec.recommend_histories(cut, k=K_FULL, at=at)
  assert len(recs.users) == len(data.val_user)
  ranks = np.array([int(np.flatnonzero(row == t)[0]) for row, t in zip(recs.dense, target)])
  # the ranks full-protocol evaluation computes, case by case
  batches = pipeline.EvalBatches(data, 'val', 64, int(rec.config.data.max_len))
  eval_ranks = []
  for i in range(batches.num_batches):
    b = batches(i)
    h = rec.model.apply({'params': rec.params}, b['items'], b['behaviors'], b['gaps'],
                        method='last_state')
    r = retrieval.rank_in_catalogue(rec.params, h, b['target'], 64,
                                    rec.model.precision, data.num_items)
    eval_ranks.append(np.asarray(jax.device_get(r))[b['mask']])
  eval_ranks = np.concatenate(eval_ranks)
  np.testing.assert_array_equal(ranks, eval_ranks)
  full = evaluator.evaluate_run(rec.config, run['workdir'], protocol='full')['metrics']
  ndcg = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean()
  assert abs(full['val/NDCG@10'] - ndcg) < 1e-6


@pytest.mark.slow
def test_export_serves_the_same_lists_without_flax(run, tmp_path):
  """The exported artifact, loaded in a process that never imports flax or
  the model code (gear_jax.models), returns the in-process lists; scores within 1e-5."""
  artifact = tmp_path / 'srv' / 'model.jaxexport'
  out = run_module('gear_jax.export', '--workdir', run['workdir'], '--output',
                   str(artifact), '--k', '12')
  assert out.returncode == 0, out.stderr[-3000:]
  info = json.load(open(str(artifact) + '.vocab.json'))
  assert info['platforms'] == ['cpu', 'cuda'] and info['k'] == 12
  assert info['vocab']['items'][:2] == ['0001', '0002']
  users = ['007', '7', '120', '299']
  hist = {u: [(i, b, t) for uu, i, b, t in zip(run['users'], run['items'],
                                                 run['behaviors'], run['stamps'])
              if uu == u] for u in users}
  request = dict(items=[[i for i, _, _ in hist[u]] for u in users],
                 behaviors=[[b for _, b, _ in hist[u]] for u in users],
                 timestamps=[[t for _, _, t in hist[u]] for u in users])
  script = f'''
import json, sys
from gear_jax import serving
m = serving.load({str(artifact)!r}, batch_size=3)
req = json.loads(sys.stdin.read())
h = serving.Histories.from_lists(req['items'], req['behaviors'], req['timestamps'], m.vocab)
out = {{}}
for exclude in ('none', 'seen'):
  r = m.recommend_histories(h, k=10, exclude=exclude, at=1600000000)
  out[exclude] = dict(items=r.items.tolist(), scores=r.scores.tolist())
one = m.recommend_history(req['items'][0], req['behaviors'][0], req['timestamps'][0], k=5)
out['one'] = [one[0].tolist(), one[1].tolist()]
out['modules'] = sorted(m for m in sys.modules if m.startswith(('flax', 'gear_jax')))
print(json.dumps(out))
'''
  proc = subprocess.run([sys.executable, '-c', script], input=json.dumps(request),
                        capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  served = json.loads(proc.stdout.splitlines()[-1])
  assert served['modules'] == ['gear_jax', 'gear_jax.serving']
  from gear_jax import Recommender
  from gear_jax.serving import Histories
  rec = Recommender.load(run['workdir'])
  h = Histories.from_lists(request['items'], request['behaviors'], request['timestamps'],
                           rec.vocab)
  for exclude in ('none', 'seen'):
    mine = rec.recommend_histories(h, k=10, exclude=exclude, at=1600000000)
    assert mine.items.tolist() == served[exclude]['items']
    np.testing.assert_allclose(mine.scores, served[exclude]['scores'], atol=1e-5)
  items, scores = rec.recommend_history(request['items'][0], request['behaviors'][0],
                                        request['timestamps'][0], k=5)
  assert items.tolist() == served['one'][0]
  np.testing.assert_allclose(scores, served['one'][1], atol=1e-5)
  by_id = rec.recommend(['007'], k=5, at=1600000000)
  assert by_id.items[0].tolist() == served['none']['items'][0][:5]


def test_interrupted_export_leaves_the_old_artifact(run, tmp_path, monkeypatch):
  """A stop while the artifact is written keeps the old file (no partial one, no
  temporary left); a stop between artifact and sidecar is caught when loading."""
  from gear_jax import Recommender, atomic, exporter, serving
  rec = Recommender.load(run['workdir'])
  path = str(tmp_path / 'model.jaxexport')
  exporter.export_recommender(rec, path, k=5)
  old = open(path, 'rb').read()
  real = atomic.atomic_write

  class Torn:
    def __init__(self, f):
      self.f = f

    def write(self, data):
      self.f.write(data[:len(data) // 2])
      raise KeyboardInterrupt

  import contextlib

  @contextlib.contextmanager
  def torn_write(p, mode='wb'):
    with real(p, mode) as f:
      yield Torn(f)

  monkeypatch.setattr(atomic, 'atomic_write', torn_write)
  with pytest.raises(KeyboardInterrupt):
    exporter.export_recommender(rec, path, k=7)
  assert open(path, 'rb').read() == old
  assert sorted(os.listdir(tmp_path)) == ['model.jaxexport', 'model.jaxexport.vocab.json']
  assert serving.load(path).max_k == 5
  # the artifact replaced, then a stop before the sidecar: refused, not misread
  calls = []

  @contextlib.contextmanager
  def stop_at_sidecar(p, mode='wb'):
    calls.append(p)
    if p.endswith(serving.SIDECAR_SUFFIX):
      raise KeyboardInterrupt
    with real(p, mode) as f:
      yield f

  monkeypatch.setattr(atomic, 'atomic_write', stop_at_sidecar)
  with pytest.raises(KeyboardInterrupt):
    exporter.export_recommender(rec, path, k=7)
  with pytest.raises(ValueError, match='does not belong to'):
    serving.load(path)
