"""Online serving: bucketed scoring, batching concurrent callers, the HTTP endpoint.

The artifact is exported from the tiny run of `conftest.shop_run` (150 items with
text ids); the HTTP tests talk to real `python -m gear_jax.serve` processes over a
loopback socket."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, run_module, shop_run
from gear_jax import serving

K_EXPORTED = 12
USERS = ['007', '7', '120', '299', '150', '042', '001', '033', '099', '250']


@pytest.fixture(scope='module')
def shop(tmp_path_factory):
  """The tiny run, its artifact (top 12) and the shoppers of USERS as request lists."""
  run = shop_run(tmp_path_factory.mktemp('serving'))
  artifact = str(run['root'] / 'model.jaxexport')
  out = run_module('gear_jax.export', '--workdir', run['workdir'], '--output', artifact,
                   '--k', str(K_EXPORTED), '--platforms', 'cpu')
  assert out.returncode == 0, out.stderr[-3000:]
  shoppers = []
  for user in USERS:
    rows = [(i, b, t) for u, i, b, t in zip(run['users'], run['items'], run['behaviors'],
                                              run['stamps']) if u == user]
    assert rows, user
    shoppers.append(dict(items=[r[0] for r in rows], behaviors=[r[1] for r in rows],
                         timestamps=[r[2] for r in rows]))
  return dict(run, artifact=artifact, shoppers=shoppers,
              cache=str(run['root'] / 'compiled'))


def _hist(model, shoppers):
  return serving.Histories.from_lists([s['items'] for s in shoppers],
                                      [s['behaviors'] for s in shoppers],
                                      [s['timestamps'] for s in shoppers], model.vocab)


# -- in process ---------------------------------------------------------------------------

def test_buckets_agree_with_the_unbatched_path(shop):
  """n users are scored on the smallest bucket that holds them, each bucket compiled
  once; the lists equal those of one full padded batch (the path before buckets)
  item for item, scores within 1e-6; inside one bucket a user's row is bit for bit
  the same whoever else is in it; more than max_batch users go in steps."""
  model = serving.load(shop['artifact'], max_batch=8)
  assert model.buckets == (1, 2, 4, 8)
  hist = _hist(model, shop['shoppers'][:5])
  recs = model.recommend_histories(hist, k=10, exclude='seen')
  enc = model.encode(hist, k=10, exclude='seen', at=None)
  full = [np.pad(a, ((0, 128 - 5), (0, 0)))
          for a in (enc.items, enc.behaviors, enc.gaps, enc.exclude)]
  scores, ids = model.score_batch(*full, 10)
  np.testing.assert_array_equal(recs.dense, ids[:5])
  np.testing.assert_allclose(recs.scores, scores[:5], rtol=1e-6)
  for r, s in enumerate(shop['shoppers'][:5]):
    assert not set(recs.items[r].tolist()) & set(s['items'])  # 'seen' excluded
  flipped = model.recommend_histories(hist.take(np.arange(4, -1, -1)), k=10,
                                      exclude='seen')
  np.testing.assert_array_equal(flipped.scores[::-1], recs.scores)  # bit for bit
  one = model.recommend_histories(hist.take(np.array([2])), k=10, exclude='seen')
  np.testing.assert_array_equal(one.dense[0], recs.dense[2])
  np.testing.assert_allclose(one.scores[0], recs.scores[2], rtol=1e-6)
  many = _hist(model, shop['shoppers'] * 2)  # 20 users: 3 steps of 8, 2 in flight
  steps = model.recommend_histories(many, k=10, exclude='seen')
  np.testing.assert_array_equal(steps.dense[:5], recs.dense)
  np.testing.assert_allclose(steps.scores[:5], recs.scores, rtol=1e-6)
  compiled = set(model._programs)  # (rows, exclusion width)
  assert {rows for rows, _ in compiled} == {1, 8, 128}
  model.recommend_histories(hist, k=3, exclude='seen')
  model.recommend_histories(many, k=10, exclude='seen')
  assert set(model._programs) == compiled  # never compiled per call


def test_concurrent_callers_each_get_their_own_answer(shop):
  """8 threads at once: with a wait long enough to gather them, one batch of 8 whose
  rows are bit for bit those of one 8-user call; without a wait (the default) each
  still gets its own list (scores within 1e-6 of scoring it alone)."""
  gathered = serving.load(shop['artifact'], max_batch=8, max_wait_ms=5000)
  alone = serving.load(shop['artifact'], max_batch=8)
  shoppers = shop['shoppers'][:8]
  direct = alone.recommend_histories(_hist(alone, shoppers), k=5)
  for model in (gathered, alone):
    model.warmup()
    barrier, answers = threading.Barrier(8), [None] * 8

    def call(i, model=model):
      s = shoppers[i]
      barrier.wait()
      answers[i] = model.recommend_history(s['items'], s['behaviors'], s['timestamps'],
                                           k=5)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    for i, (items, scores) in enumerate(answers):
      assert items.tolist() == direct.items[i].tolist(), i
      if model is gathered:
        np.testing.assert_array_equal(scores, direct.scores[i])
      else:
        np.testing.assert_allclose(scores, direct.scores[i], rtol=1e-6)
  assert (gathered.batcher().batches, gathered.batcher().requests) == (1, 8)
  assert alone.batcher().requests == 9  # the direct call, then 8 callers


def test_batcher_merges_waiting_callers_and_keeps_errors_apart():
  """A lone caller scores in its own thread; callers that queue while a batch runs
  are scored together (never more than max_rows rows); an error reaches only the
  callers of its batch, and the batcher goes on."""
  threads_seen, batches = [], []

  def run(requests):
    threads_seen.append(threading.get_ident())
    batches.append(list(requests))
    time.sleep(0.05)  # the scorer is busy: the others queue
    if 'boom' in requests:
      raise RuntimeError('boom')
    return [r * 10 for r in requests]

  b = serving.Batcher(run, max_rows=4, workers=1)
  assert b(1) == 10 and threads_seen == [threading.get_ident()]
  out, errors = {}, {}

  def call(r):
    try:
      out[r] = b(r)
    except RuntimeError as e:
      errors[r] = str(e)

  threads = [threading.Thread(target=call, args=(r,)) for r in range(2, 12)]
  for t in threads:
    t.start()
    time.sleep(0.002)
  for t in threads:
    t.join()
  assert out == {r: r * 10 for r in range(2, 12)}
  assert len(batches) < 1 + 10 and max(len(x) for x in batches) <= 4
  first = threading.Thread(target=call, args=(20,))
  first.start()
  time.sleep(0.01)  # 'boom' and 21 queue behind 20: one batch
  bad = [threading.Thread(target=call, args=(r,)) for r in ('boom', 21)]
  for t in bad:
    t.start()
  for t in [first, *bad]:
    t.join()
  assert out[20] == 200 and errors == {'boom': 'boom', 21: 'boom'}
  assert b(3) == 30


# -- over HTTP ----------------------------------------------------------------------------

def _start(artifact, *flags):
  """`python -m gear_jax.serve` on a free loopback port: (process, port, startup line)."""
  proc = subprocess.Popen([sys.executable, '-m', 'gear_jax.serve', '--artifact', artifact,
                           '--port', '0', '--max_batch', '8', *flags], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:
    if line.startswith('serving http://'):
      return proc, int(line.split()[1].rsplit(':', 1)[1]), line
  proc.wait()
  raise AssertionError(f'the server did not start (exit {proc.returncode})')


@pytest.fixture(scope='module')
def server(shop):
  proc, port, line = _start(shop['artifact'], '--compile_cache', shop['cache'])
  assert len(os.listdir(shop['cache'])) >= 4  # the 4 buckets (and maybe more)
  yield dict(proc=proc, port=port, line=line)
  proc.kill()
  proc.wait()


def _call(port, method, path, body=None, conn=None):
  """(status, parsed JSON, raw body) over `conn` (a new connection without one)."""
  conn = conn or http.client.HTTPConnection('127.0.0.1', port, timeout=60)
  data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
  conn.request(method, path, data)
  response = conn.getresponse()
  raw = response.read()
  return response.status, json.loads(raw), raw


@pytest.mark.slow
def test_server_answers_as_the_loader_does(shop, server):
  """GET /health and /metadata; POST /recommend of one shopper and of a list (mixed k,
  exclude and at): the loader's lists, scores within 1e-6; unknown items are dropped
  and counted; a shopper with no known item gets empty lists."""
  port, line = server['port'], server['line']
  assert 'buckets 1/2/4/8' in line and '150 items' in line
  status, health, _ = _call(port, 'GET', '/health')
  assert status == 200 and health['status'] == 'ok'
  status, meta, _ = _call(port, 'GET', '/metadata')
  side = json.load(open(shop['artifact'] + serving.SIDECAR_SUFFIX))
  assert status == 200 and meta['artifact_digest'] == side['artifact_digest']
  assert (meta['num_items'], meta['max_k'], meta['max_len']) == (150, K_EXPORTED, 12)
  assert meta['behaviors'] == ['pv', 'fav', 'cart', 'buy'] and meta['buckets'] == [1, 2, 4, 8]
  model = serving.load(shop['artifact'], max_batch=8)
  s0, s1 = shop['shoppers'][:2]
  status, one, _ = _call(port, 'POST', '/recommend',
                         dict(s0, items=s0['items'] + ['nope'], behaviors=s0['behaviors']
                              + ['pv'], timestamps=s0['timestamps'] + [1501137700]))
  items, scores = model.recommend_history(s0['items'], s0['behaviors'], s0['timestamps'])
  assert status == 200 and one['items'] == items.tolist() and one['unknown'] == 1
  np.testing.assert_allclose(one['scores'], scores, rtol=1e-6)
  asks = [dict(s1, k=3, exclude='seen', at=1600000000), dict(s0, k=K_EXPORTED),
          dict(items=['nope'], behaviors=['buy'], timestamps=[5]),
          dict(s1, exclude='target'),
          dict(s1, k=4, at=1600000000)]  # with and without `at` in one call
  status, many, _ = _call(port, 'POST', '/recommend', asks)
  assert status == 200 and len(many) == 5
  for ask, got in zip(asks, many):
    fields = {k: v for k, v in ask.items() if k in ('k', 'exclude', 'at')}
    items, scores = model.recommend_history(ask['items'], ask['behaviors'],
                                            ask['timestamps'], **fields)
    assert got['items'] == items.tolist(), ask.get('exclude')
    np.testing.assert_allclose(got['scores'], scores, rtol=1e-6)
  assert many[2] == {'items': [], 'scores': [], 'unknown': 1}
  assert all(isinstance(i, str) for i in many[1]['items'])  # text ids stay text


BAD = [  # (method, path, body, status, words of the error)
    ('POST', '/recommend', b'{"items": [', 400, 'not JSON'),
    ('POST', '/recommend', {'items': [], 'behaviors': [], 'timestamps': [], 'x': 1}, 400,
     "unknown field 'x'"),
    ('POST', '/recommend', {'items': '0001', 'behaviors': [], 'timestamps': []}, 400,
     "'items' must be a list"),
    ('POST', '/recommend', {'items': ['0001'], 'behaviors': ['pv'], 'timestamps': [1.5]},
     400, 'timestamps[0] is 1.5'),
    ('POST', '/recommend', {'items': ['0001'], 'behaviors': ['pv'], 'timestamps': []},
     400, '1 items, 1 behaviors and 0 timestamps'),
    ('POST', '/recommend', {'items': ['0001'], 'behaviors': ['peek'], 'timestamps': [1]},
     400, "unknown behavior 'peek'"),
    ('POST', '/recommend', {'items': ['0001'], 'behaviors': ['pv'], 'timestamps': [1],
                            'k': K_EXPORTED + 1}, 400, f'from 1 to {K_EXPORTED}'),
    ('POST', '/recommend', [{'items': ['0001'], 'behaviors': ['pv'], 'timestamps': [1]},
                            {'items': ['0001'], 'behaviors': ['pv'], 'timestamps': [1],
                             'exclude': 'all'}], 400, 'shopper 1: exclude is "all"'),
    ('POST', '/recommend', b' ' * (1024 * 1024 + 1), 413, 'the limit is 1,048,576'),
    ('GET', '/recommend', None, 405, 'use POST'),
    ('PUT', '/health', b'{}', 405, 'use GET'),
    ('GET', '/nowhere', None, 404, 'the paths are'),
]


@pytest.mark.slow
def test_bad_requests_get_a_4xx_and_the_server_goes_on(shop, server):
  """Every bad request of BAD gets its status and one line of JSON, on one keep-alive
  connection that keeps working; then good requests are still answered."""
  port = server['port']
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
  good = dict(shop['shoppers'][0], k=3)
  for method, path, body, status, words in BAD:
    got, answer, raw = _call(port, method, path, body, conn)
    assert got == status, (path, body, answer)
    assert list(answer) == ['error'] and words in answer['error'], answer
    assert raw.count(b'\n') == 1
  assert _call(port, 'POST', '/recommend', good, conn)[0] == 200
  with socket.create_connection(('127.0.0.1', port), timeout=30) as s:  # no length
    s.sendall(b'POST /recommend HTTP/1.1\r\nHost: x\r\n\r\n')
    assert s.recv(4096).startswith(b'HTTP/1.1 411')
  assert _call(port, 'POST', '/recommend', good)[0] == 200
  assert server['proc'].poll() is None


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_then_exits_143(shop):
  """SIGTERM while a request is half sent: new connections are refused, an idle
  keep-alive connection is closed, the request is answered (Connection: close), then
  the server exits 143; a second server on the same port is refused with one error
  line (exit 2). It reads its programs from the --compile_cache that the module's
  server filled."""
  proc, port, _ = _start(shop['artifact'], '--compile_cache', shop['cache'])
  try:
    out = run_module('gear_jax.serve', '--artifact', shop['artifact'], '--port',
                     str(port), '--max_batch', '1', timeout=300)
    assert out.returncode == 2 and f'cannot listen on 127.0.0.1:{port}' in out.stderr
    idle = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    assert _call(port, 'GET', '/health', conn=idle)[0] == 200
    body = json.dumps(dict(shop['shoppers'][0], k=4)).encode()
    flight = socket.create_connection(('127.0.0.1', port), timeout=30)
    flight.sendall(b'POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: '
                   + str(len(body)).encode() + b'\r\n\r\n' + body[:10])
    time.sleep(0.5)  # the server has read the request's head
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the listener closes
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        time.sleep(0.05)
      except OSError:
        break
    else:
      raise AssertionError('still accepting connections after SIGTERM')
    assert idle.sock.recv(1) == b''  # the idle connection was closed
    flight.sendall(body[10:])
    answer = b''
    while chunk := flight.recv(65536):
      answer += chunk
    head, _, payload = answer.partition(b'\r\n\r\n')
    assert head.startswith(b'HTTP/1.1 200') and b'Connection: close' in head
    assert len(json.loads(payload)['items']) == 4
    assert proc.wait(timeout=60) == 143
    assert 'stopped: 2 requests answered' in proc.stderr.read()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_serving_imports_only_jax_numpy_and_the_standard_library():
  """gear_jax/serving.py may be copied alone: every import in it (module level or in
  a function) is jax, numpy or the standard library; never the HTTP server."""
  import ast
  tree = ast.parse(open(os.path.join(REPO, 'gear_jax', 'serving.py')).read())
  names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  tops = {name.split('.')[0] for name in names}
  assert tops - {'jax', 'numpy'} <= set(sys.stdlib_module_names) | {'__future__'}, tops
  assert not tops & {'gear_jax', 'http', 'flax', 'socketserver'}, tops
