"""Serving latency: the in-process loader and the HTTP endpoint, one command.

  python scripts/benchmark_serving.py [--dir DIR] [--requests 2000] [--time_cap_s 30]
      [--clients 1,4,16] [--wait_ms MS] [--artifacts demo,retail] [--skip_http]
      [--compare_tree PATH] [--json PATH]

Builds once (in --dir, default a temporary folder) two artifacts with
`python -m gear_jax.export` (top 100, the export's default):
  demo    the quick-start run's shape (configs/demo.py: 1,500 items, L = 50), trained
          for one epoch (latency does not depend on the weights)
  retail  99,037 items, the retail shape (L = 50, d = 32, 4 upper blocks), freshly
          initialised parameters: the run of scripts/benchmark_recommend.py (`build`)
Requests are the first shoppers of each data file, their whole histories, top 10.

Then, per artifact:
  in-process  `serving.load(...)` in a child process: `recommend_history` of one
              shopper, and `recommend_histories` of 8 and 128 shoppers (histories
              built from lists inside the timed call), after warm-up calls
  http        `python -m gear_jax.serve` on 127.0.0.1 (a free port) as a subprocess,
              and 1, 4 and 16 client threads with keep-alive connections sending
              POST /recommend, one shopper each, until --requests are answered or
              --time_cap_s pass (after a short warm-up); then the same with
              --max_batch 1 (each request scored alone) for the largest client count,
              and with --max_wait_ms --wait_ms when given. The server is stopped with
              SIGTERM and must exit 143.
p50 / p99 are per request (per call in process); requests/s over the wall time of the
phase. --compare_tree PATH runs the in-process part also with PYTHONPATH=PATH (e.g. a
`git worktree` of an older commit), labelled by the path. Prints markdown tables;
--json writes every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
IN_PROCESS = ((1, 300), (8, 100), (128, 20))  # (shoppers per call, calls)


def _run(*args: str) -> None:
  proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f'{" ".join(args[:3])} failed:\n{proc.stderr[-3000:]}')


def _export(workdir: str, artifact: str) -> None:
  if not os.path.exists(artifact + '.vocab.json'):
    _run('-m', 'gear_jax.export', '--workdir', workdir, '--output', artifact)


def demo_artifact(directory: str) -> tuple[str, str]:
  """(artifact, data file) of a one-epoch run of configs/demo.py."""
  data, workdir = os.path.join(directory, 'demo.txt'), os.path.join(directory, 'demo_run')
  artifact = os.path.join(directory, 'demo.jaxexport')
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    _run('-m', 'gear_jax.train', '--config', os.path.join(REPO, 'configs', 'demo.py'),
         '--workdir', workdir, f'--config.data.path={data}',
         '--config.data.synthetic.enabled=True', '--config.train.num_epochs=1',
         '--config.eval.other_protocol=False')
  _export(workdir, artifact)
  return artifact, data


def retail_artifact(directory: str) -> tuple[str, str]:
  """(artifact, data file) at 99,037 items: scripts/benchmark_recommend.py's run."""
  sys.path.insert(0, SCRIPTS)
  import benchmark_recommend
  data, workdir, _ = benchmark_recommend.build(directory, 99_037, 20_000, 256)
  artifact = os.path.join(directory, 'retail.jaxexport')
  _export(workdir, artifact)
  return artifact, data


def read_shoppers(path: str, n: int) -> list[dict]:
  """The first `n` shoppers of a tsv data file (grouped by user), whole histories."""
  shoppers: dict[str, dict] = {}
  with open(path) as f:
    for line in f:
      user, item, behavior, stamp = line.rstrip('\n').split('\t')
      if user not in shoppers:
        if len(shoppers) == n:
          break
        shoppers[user] = dict(items=[], behaviors=[], timestamps=[])
      s = shoppers[user]
      s['items'].append(int(item) if item.isdigit() else item)
      s['behaviors'].append(behavior)
      s['timestamps'].append(int(stamp))
  return list(shoppers.values())


def _percentiles(seconds: list[float]) -> dict:
  ms = np.asarray(seconds) * 1e3
  return dict(p50_ms=round(float(np.percentile(ms, 50)), 2),
              p99_ms=round(float(np.percentile(ms, 99)), 2))


# -- in process ---------------------------------------------------------------------------

def phase_in_process(artifact: str, data: str, time_cap: float) -> list[dict]:
  """The loader's latency per call at 1, 8 and 128 shoppers (run in a child)."""
  from gear_jax import serving
  model = serving.load(artifact)
  shoppers = read_shoppers(data, 128)
  rows = []
  for size, calls in IN_PROCESS:
    def call(i, size=size):
      if size == 1:
        s = shoppers[i % len(shoppers)]
        return model.recommend_history(s['items'], s['behaviors'], s['timestamps'], k=10)
      group = [shoppers[(i * size + j) % len(shoppers)] for j in range(size)]
      hist = serving.Histories.from_lists([s['items'] for s in group],
                                          [s['behaviors'] for s in group],
                                          [s['timestamps'] for s in group], model.vocab)
      return model.recommend_histories(hist, k=10)
    for i in range(3):  # compiles, off the clock
      call(i)
    times, start = [], time.perf_counter()
    for i in range(calls):
      t = time.perf_counter()
      call(i)
      times.append(time.perf_counter() - t)
      if time.perf_counter() - start > time_cap:
        break
    rows.append(dict(batch=size, calls=len(times), **_percentiles(times),
                     users_per_s=round(size * len(times) / sum(times), 1)))
  return rows


def run_in_process(args, artifact: str, data: str, tree: str | None = None) -> list[dict]:
  env = dict(os.environ)
  if tree:
    env['PYTHONPATH'] = tree + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--phase',
                         'in_process', '--artifact', artifact, '--data', data,
                         '--time_cap_s', str(args.time_cap_s)],
                        capture_output=True, text=True, env=env,
                        cwd=tempfile.gettempdir())
  if proc.returncode:
    raise SystemExit(f'in-process phase failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# -- over HTTP ----------------------------------------------------------------------------

def start_server(artifact: str, *flags: str) -> tuple[subprocess.Popen, str]:
  """`python -m gear_jax.serve` on a free loopback port; (process, URL)."""
  proc = subprocess.Popen([sys.executable, '-m', 'gear_jax.serve', '--artifact', artifact,
                           '--port', '0', *flags], cwd=REPO, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  for line in proc.stderr:
    if line.startswith('serving http://'):
      threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain it
      return proc, line.split()[1]
  raise SystemExit(f'the server did not start (exit {proc.wait()})')


def stop_server(proc: subprocess.Popen) -> int:
  proc.send_signal(signal.SIGTERM)
  try:
    return proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    return proc.wait()


class Client:
  """One keep-alive connection sending pre-encoded POST /recommend requests over a raw
  socket: a light load generator (http.client costs the 2 cores the server runs on
  several times more per request), reading each answer whole by its Content-Length."""

  def __init__(self, host: str, port: int):
    self.sock = socket.create_connection((host, port), timeout=120)
    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.buffer = b''

  @staticmethod
  def encode(body: bytes) -> bytes:
    return (b'POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: '
            b'application/json\r\nContent-Length: %d\r\n\r\n' % len(body)) + body

  def call(self, request: bytes) -> tuple[int, bytes]:
    """(status, body) of one request."""
    self.sock.sendall(request)
    while (end := self.buffer.find(b'\r\n\r\n')) < 0:
      self._read()
    head = self.buffer[:end]
    length = int(head.split(b'Content-Length: ', 1)[1].split(b'\r\n', 1)[0])
    while len(self.buffer) < end + 4 + length:
      self._read()
    body = self.buffer[end + 4:end + 4 + length]
    self.buffer = self.buffer[end + 4 + length:]
    return int(head[9:12]), body

  def _read(self) -> None:
    chunk = self.sock.recv(1 << 16)
    if not chunk:
      raise ConnectionError('the server closed the connection')
    self.buffer += chunk

  def close(self) -> None:
    self.sock.close()


def load_test(url: str, bodies: list[bytes], clients: int, requests: int,
              time_cap: float) -> dict:
  """`clients` threads, one keep-alive connection each, POST /recommend until
  `requests` are answered or `time_cap` seconds pass."""
  host, port = url.split('//')[1].split(':')
  counter, lock = itertools.count(), threading.Lock()
  latencies, errors = [], []
  encoded = [Client.encode(b) for b in bodies]
  start = time.perf_counter()
  deadline = start + time_cap

  def client():
    conn = Client(host, int(port))
    mine = []
    while (i := next(counter)) < requests and time.perf_counter() < deadline:
      t = time.perf_counter()
      status, body = conn.call(encoded[i % len(encoded)])
      mine.append(time.perf_counter() - t)
      if status != 200 or not body.startswith(b'{"items":'):
        errors.append(status)
    conn.close()
    with lock:
      latencies.extend(mine)

  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  return dict(clients=clients, requests=len(latencies), errors=len(errors),
              seconds=round(wall, 2), **_percentiles(latencies),
              requests_per_s=round(len(latencies) / wall, 1))


def run_http(args, artifact: str, data: str) -> list[dict]:
  shoppers = read_shoppers(data, 500)
  bodies = [json.dumps(dict(s, k=10)).encode() for s in shoppers]
  most = max(args.clients)
  modes = [('batched', [], args.clients), ('alone (--max_batch 1)', ['--max_batch', '1'],
                                           [most])]
  if args.wait_ms:
    modes.append((f'--max_wait_ms {args.wait_ms:g}', ['--max_wait_ms', str(args.wait_ms)],
                  [most]))
  rows = []
  for mode, flags, clients in modes:
    proc, url = start_server(artifact, *flags)
    try:
      for n in clients:
        load_test(url, bodies, n, 20 * n, args.time_cap_s)  # warm-up
        row = load_test(url, bodies, n, args.requests, args.time_cap_s)
        rows.append(dict(mode=mode, **row))
        print(f'  {mode}, {n} clients: {row["requests_per_s"]:,.0f} requests/s, p50 '
              f'{row["p50_ms"]} ms, p99 {row["p99_ms"]} ms', file=sys.stderr, flush=True)
    finally:
      code = stop_server(proc)
    if code != 128 + signal.SIGTERM:
      raise SystemExit(f'the server exited {code} on SIGTERM, expected 143')
  return rows


# -- the report ---------------------------------------------------------------------------

def tables(result: dict) -> str:
  lines = ['| artifact | loader | shoppers per call | calls | p50 ms | p99 ms | '
           'users/s |', '|---|---|---|---|---|---|---|']
  for name, a in result['artifacts'].items():
    for loader, rows in a['in_process'].items():
      for r in rows:
        lines.append(f'| {name} | {loader} | {r["batch"]} | {r["calls"]} | '
                     f'{r["p50_ms"]} | {r["p99_ms"]} | {r["users_per_s"]:,.0f} |')
  lines += ['', '| artifact | server | clients | requests | p50 ms | p99 ms | '
            'requests/s |', '|---|---|---|---|---|---|---|']
  for name, a in result['artifacts'].items():
    for r in a.get('http', []):
      lines.append(f'| {name} | {r["mode"]} | {r["clients"]} | {r["requests"]:,} | '
                   f'{r["p50_ms"]} | {r["p99_ms"]} | {r["requests_per_s"]:,.0f} |')
    if 'batched_over_alone' in a:
      lines.append(f'| {name} | batched / alone at {a["clients"]} clients | | | | | '
                   f'{a["batched_over_alone"]:.2f}x |')
  return '\n'.join(lines)


def _ratio(rows: list[dict], clients: int) -> float:
  rate = {r['mode']: r['requests_per_s'] for r in rows if r['clients'] == clients}
  return round(rate['batched'] / rate['alone (--max_batch 1)'], 2)


def measure(args, name: str, artifact: str, data: str) -> dict:
  out = dict(artifact=artifact, in_process={})
  out['in_process']['this tree'] = run_in_process(args, artifact, data)
  if args.compare_tree:
    out['in_process'][args.compare_tree] = run_in_process(args, artifact, data,
                                                          args.compare_tree)
  print(f'{name}: in-process done', file=sys.stderr, flush=True)
  if not args.skip_http:
    out['http'] = run_http(args, artifact, data)
    out['clients'] = max(args.clients)
    out['batched_over_alone'] = _ratio(out['http'], out['clients'])
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dir', default=None, help='where the runs and artifacts are kept')
  p.add_argument('--requests', type=int, default=2000, help='per client count')
  p.add_argument('--time_cap_s', type=float, default=30.0, help='per measurement')
  p.add_argument('--clients', type=lambda s: [int(c) for c in s.split(',')],
                 default=[1, 4, 16])
  p.add_argument('--wait_ms', type=float, default=0.0,
                 help='also measure the server with this --max_wait_ms')
  p.add_argument('--artifacts', type=lambda s: s.split(','), default=['demo', 'retail'],
                 help='demo, retail or both')
  p.add_argument('--skip_http', action='store_true')
  p.add_argument('--compare_tree', default=None)
  p.add_argument('--json', default=None, metavar='PATH')
  p.add_argument('--phase', choices=['in_process'], help=argparse.SUPPRESS)
  p.add_argument('--artifact', help=argparse.SUPPRESS)
  p.add_argument('--data', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.phase:
    print(json.dumps(phase_in_process(args.artifact, args.data, args.time_cap_s)))
    return
  keep = args.dir is not None
  args.dir = args.dir or tempfile.mkdtemp(prefix='gear_bench_serving_')
  os.makedirs(args.dir, exist_ok=True)
  result = dict(date=time.strftime('%Y-%m-%d'), cpus=os.cpu_count(),
                load_before=os.getloadavg(), artifacts={})
  builds = dict(demo=('demo', demo_artifact), retail=('retail 99,037', retail_artifact))
  for name, build in (builds[a] for a in args.artifacts):
    artifact, data = build(args.dir)
    result['artifacts'][name] = measure(args, name, artifact, data)
  result['load_after'] = os.getloadavg()
  print(tables(result))
  print(f'\n{result["date"]}, {result["cpus"]} CPUs, load average before '
        f'{result["load_before"][0]:.2f}, after {result["load_after"][0]:.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  if not keep:
    import shutil
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
  main()
