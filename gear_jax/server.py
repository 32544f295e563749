"""An HTTP endpoint for an exported recommender (the library behind ``python -m
gear_jax.serve``; docs/serving.md).

  POST /recommend   {"items": [...], "behaviors": [...], "timestamps": [...], "k": 10,
                     "exclude": "none" | "seen" | "target", "at": seconds | null}
                    or a JSON list of such shoppers
                -> {"items": [...], "scores": [...], "unknown": n} (a list for a list)
  GET /health   -> {"status": "ok", "requests": scored, "batches": scoring calls}
  GET /metadata -> catalogue size, behaviors, L, the largest k, buckets, artifact hash

Only `items`, `behaviors` and `timestamps` are required (one entry per interaction,
raw item ids, behavior names or ids 1..n_b, seconds). Items the model does not know
are left out and counted in `unknown`; a shopper with no known item gets empty lists.
A bad request (bad JSON, an unknown field, a wrong type, k above the artifact's,
an unknown behavior, a body over the limit, an unknown path or method) gets a 4xx and
one line of JSON, ``{"error": "..."}``; it never reaches the scorer, so other requests
do not see it.

The standard library's `ThreadingHTTPServer` (a thread per connection, HTTP/1.1
keep-alive) is enough here and adds no dependency: the scorer, not parsing HTTP, is
the cost of a request, and the batching across connections' threads is done by
`serving.Batcher` behind `ServedModel.recommend_histories`. `drain` stops it: no new
connections, idle ones closed, requests already received answered (with ``Connection:
close``).
"""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time
import traceback

import numpy as np

from gear_jax import serving

MAX_BODY = 1 << 20  # bytes of a request body
DISCARD = 64 << 20  # bytes of a refused body read (and dropped) before answering
FIELDS = ('items', 'behaviors', 'timestamps', 'k', 'exclude', 'at')
_MAX_INT = 2**53  # times beyond this are not seconds (and gaps stay in int64)


class RequestError(ValueError):
  """A request the server refuses: its HTTP status and a one-line message."""

  def __init__(self, status: int, message: str):
    self.status = status
    super().__init__(message)


# -- requests -----------------------------------------------------------------------------

def parse_body(body: bytes, vocab: serving.Vocabulary, max_k: int
               ) -> tuple[list[dict], bool]:
  """The shoppers of a /recommend body, checked, and whether it was a list."""
  try:
    obj = json.loads(body)
  except (ValueError, RecursionError) as e:
    raise RequestError(400, f'the body is not JSON: {e}') from None
  many = isinstance(obj, list)
  shoppers = obj if many else [obj]
  out = []
  for i, s in enumerate(shoppers):
    try:
      out.append(parse_shopper(s, vocab, max_k))
    except RequestError as e:
      raise RequestError(e.status, f'shopper {i}: {e}' if many else str(e)) from None
  return out, many


def _ints(values, name: str, *, allow_text: bool = False) -> None:
  kinds = (int, str) if allow_text else int
  if all(type(v) in (int, str) if allow_text else type(v) is int for v in values):
    return  # the common case, fast; bool is not int here
  for j, v in enumerate(values):
    if not isinstance(v, kinds) or isinstance(v, bool):
      raise RequestError(400, f'{name}[{j}] is {json.dumps(v)[:40]}: expected '
                         f'{"a string or an integer" if allow_text else "an integer"}')


def parse_shopper(s, vocab: serving.Vocabulary, max_k: int) -> dict:
  """One shopper's request with its defaults (k 10, exclude 'none', at None)."""
  if not isinstance(s, dict):
    raise RequestError(400, 'a shopper is a JSON object with items, behaviors and '
                       'timestamps')
  unknown = sorted(set(s) - set(FIELDS))
  if unknown:
    raise RequestError(400, f'unknown field {unknown[0]!r}; the fields are '
                       f'{", ".join(FIELDS)}')
  for name in FIELDS[:3]:
    if not isinstance(s.get(name), list):
      raise RequestError(400, f'{name!r} must be a list' if name in s
                         else f'{name!r} is missing')
  n = len(s['items'])
  if len(s['behaviors']) != n or len(s['timestamps']) != n:
    raise RequestError(400, f'{n} items, {len(s["behaviors"])} behaviors and '
                       f'{len(s["timestamps"])} timestamps: one of each per interaction')
  _ints(s['items'], 'items', allow_text=True)
  _ints(s['behaviors'], 'behaviors', allow_text=True)
  _ints(s['timestamps'], 'timestamps')
  try:
    vocab.behavior_ids(s['behaviors'])
  except ValueError as e:
    raise RequestError(400, str(e)) from None
  k, exclude, at = s.get('k', 10), s.get('exclude', 'none'), s.get('at')
  if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
    raise RequestError(400, f'k is {json.dumps(k)[:40]}: an integer from 1 to {max_k} '
                       '(the k the artifact was exported with)')
  if exclude not in serving.EXCLUDE:
    raise RequestError(400, f'exclude is {json.dumps(exclude)[:40]}: one of '
                       f'{", ".join(serving.EXCLUDE)}')
  if at is not None and (not isinstance(at, int) or isinstance(at, bool)):
    raise RequestError(400, f'at is {json.dumps(at)[:40]}: seconds (an integer) or null')
  if any(abs(t) > _MAX_INT for t in s['timestamps'] + ([at] if at is not None else [])):
    raise RequestError(400, 'timestamps and at are seconds; this one is out of range')
  return dict(items=s['items'], behaviors=s['behaviors'], timestamps=s['timestamps'],
              k=k, exclude=exclude, at=at)


def recommend(model: serving.HistoryRecommender, shoppers: list[dict]) -> list[dict]:
  """Each shopper's answer, {'items', 'scores', 'unknown'}, in order. Shoppers with
  the same `exclude` are scored in one call."""
  out: list[dict | None] = [None] * len(shoppers)
  for mode in serving.EXCLUDE:
    rows = [i for i, s in enumerate(shoppers) if s['exclude'] == mode]
    if rows:
      for i, answer in zip(rows, _recommend_group(model, [shoppers[i] for i in rows],
                                                  mode)):
        out[i] = answer
  return out


def _recommend_group(model, group: list[dict], exclude: str) -> list[dict]:
  hist = serving.Histories.from_lists([s['items'] for s in group],
                                      [s['behaviors'] for s in group],
                                      [s['timestamps'] for s in group], model.vocab)
  at = None
  if any(s['at'] is not None for s in group):
    # "at the last interaction" for the others: the same inputs as no `at` at all
    last = (hist.timestamps[np.maximum(hist.offsets[1:] - 1, 0)] if len(hist.timestamps)
            else np.zeros(len(group), np.int64))
    at = np.array([last[r] if s['at'] is None else s['at'] for r, s in enumerate(group)],
                  np.int64)
  recs = model.recommend_histories(hist, k=max(s['k'] for s in group), exclude=exclude,
                                   at=at)
  row_of = {int(u): r for r, u in enumerate(recs.users.tolist())}
  answers = []
  for j, s in enumerate(group):
    r = row_of.get(j)
    items, scores = [], []
    if r is not None:
      keep = recs.dense[r, :s['k']] > 0
      items = recs.items[r, :s['k']][keep].tolist()
      scores = [float(v) for v in recs.scores[r, :s['k']][keep]]
    answers.append(dict(items=items, scores=scores, unknown=int(hist.unknown[j])))
  return answers


def metadata(model: serving.ServedModel, artifact: str) -> dict:
  """What GET /metadata answers."""
  info = model.info
  return dict(artifact=artifact, artifact_digest=info.get('artifact_digest'),
              num_items=model.vocab.num_items, behaviors=list(model.vocab.behaviors),
              target=model.vocab.behaviors[model.vocab.target - 1],
              max_len=model.vocab.max_len, max_k=model.max_k,
              item_ids='text' if model.vocab.items.dtype.kind == 'S' else 'integer',
              buckets=list(model.buckets), max_batch=model.batch_size,
              max_wait_ms=model.max_wait_ms, workers=model.workers,
              source=info.get('source'), created=info.get('created'))


# -- the HTTP side ------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
  """One connection's requests (keep-alive). Errors are one line of JSON."""

  protocol_version = 'HTTP/1.1'
  server_version = 'gear_jax'
  disable_nagle_algorithm = True  # an answer leaves at once, no 40 ms stalls
  wbufsize = 1 << 16  # headers and body are buffered and sent in one write (`_send`)
  timeout = 120  # seconds an idle keep-alive connection is kept
  server: Server

  def setup(self):
    super().setup()
    self.server.track(self, 'idle')

  def finish(self):
    self.server.track(self, None)
    super().finish()

  def parse_request(self):
    self.server.track(self, 'busy')  # from here until the answer is written
    return super().parse_request()

  def do_GET(self):
    self._skip_body()
    if self.path == '/health':
      batcher = self.server.model.batcher()
      self._send(200, {'status': 'ok', 'requests': batcher.requests,
                       'batches': batcher.batches})
    elif self.path == '/metadata':
      self._send(200, self.server.metadata)
    else:
      self._refuse()

  def do_POST(self):
    if self.path != '/recommend':
      return self._refuse()
    try:
      body = self._body()
      shoppers, many = parse_body(body, self.server.model.vocab, self.server.model.max_k)
      answers = recommend(self.server.model, shoppers)
    except RequestError as e:
      return self.send_error(e.status, str(e))
    except Exception:  # noqa: BLE001 - a bug: logged, answered 500, the server goes on
      traceback.print_exc(file=sys.stderr)
      return self.send_error(500, 'internal error (logged by the server)')
    self._send(200, answers if many else answers[0])

  def __getattr__(self, name: str):
    if name.startswith('do_'):  # any other method: 405, not the stdlib's 501
      return self._refuse
    raise AttributeError(name)

  def _refuse(self):
    self._skip_body()  # the connection stays usable
    routes = {'/recommend': 'POST', '/health': 'GET', '/metadata': 'GET'}
    if self.path in routes:
      self.send_error(405, f'{self.command} {self.path}: use {routes[self.path]}',
                      allow=routes[self.path])
    else:
      self.send_error(404, f'no {self.path}; the paths are {", ".join(routes)}')

  def _body(self) -> bytes:
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      self.close_connection = True  # where the body ends is unknown
      raise RequestError(411, 'send a Content-Length, not a chunked body')
    length = self.headers.get('Content-Length')
    if length is None:
      self.close_connection = True
      raise RequestError(411, 'a POST needs a Content-Length')
    if not length.isdigit():
      raise RequestError(400, f'Content-Length {length[:20]!r} is not a number')
    if int(length) > self.server.max_body:
      self._discard(int(length))
      raise RequestError(413, f'the body has {int(length):,} bytes; the limit is '
                         f'{self.server.max_body:,}')
    return self.rfile.read(int(length))

  def _skip_body(self) -> None:
    """Reads and drops the body of a request that is not answered from it."""
    length = self.headers.get('Content-Length', '0')
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      self.close_connection = True
    elif length.isdigit() and int(length):
      self._discard(int(length))
    elif not length.isdigit():
      self.close_connection = True

  def _discard(self, length: int) -> None:
    """Reads a refused body so that the client gets its 413 (a socket closed with
    unread data is reset, and the answer lost); beyond `DISCARD` bytes it closes."""
    if length > DISCARD:
      self.close_connection = True
      return
    while length > 0:
      chunk = self.rfile.read(min(length, 1 << 16))
      if not chunk:
        break
      length -= len(chunk)

  def send_error(self, code, message=None, explain=None, allow=None):
    """Every error as one line of JSON (the stdlib's is an HTML page)."""
    del explain
    self._send(code, {'error': message or self.responses.get(code, ('error',))[0]},
               allow=allow)

  def _send(self, status: int, obj, allow: str | None = None) -> None:
    data = (json.dumps(obj, separators=(',', ':')) + '\n').encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    if allow:
      self.send_header('Allow', allow)
    if self.server.stopping or self.close_connection:
      self.close_connection = True
      self.send_header('Connection', 'close')
    self.end_headers()
    if getattr(self, 'command', None) != 'HEAD':
      self.wfile.write(data)
    self.wfile.flush()
    self.server.track(self, 'idle')

  def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
    if self.server.log_requests:
      sys.stderr.write(f'{self.address_string()} - {format % args}\n')


class Server(http.server.ThreadingHTTPServer):
  """`ThreadingHTTPServer` around a `serving.ServedModel`; `start` serves in a
  background thread, `drain` stops it gracefully."""

  daemon_threads = True
  block_on_close = False  # `drain` waits for requests, not for idle connections
  request_queue_size = 128  # 16+ clients connecting at once are not refused

  def __init__(self, model: serving.ServedModel, host: str, port: int, *,
               artifact: str, log_requests: bool = False, max_body: int = MAX_BODY):
    super().__init__((host, port), Handler)
    self.model, self.log_requests, self.max_body = model, log_requests, int(max_body)
    self.metadata = metadata(model, artifact)
    self.stopping = False
    self.served = 0  # requests answered
    self._state: dict[Handler, str] = {}  # open connections: 'idle' or 'busy'
    self._changed = threading.Condition()
    self._thread: threading.Thread | None = None

  def handle_error(self, request, client_address):
    """A client that went away mid-answer is routine, not a traceback."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f'http://{host}:{port}'

  def track(self, handler: Handler, state: str | None) -> None:
    with self._changed:
      if state is None:
        self._state.pop(handler, None)
      else:
        self.served += state == 'idle' and self._state.get(handler) == 'busy'
        self._state[handler] = state
        if self.stopping and state == 'idle':
          _close_reading(handler.connection)
      self._changed.notify_all()

  def start(self) -> None:
    self._thread = threading.Thread(target=self.serve_forever, name='gear-http',
                                    daemon=True)
    self._thread.start()

  def drain(self, timeout: float = 30.0) -> int:
    """Stops accepting, closes idle connections and waits up to `timeout` seconds
    for the requests being answered; returns how many were still unanswered."""
    with self._changed:
      self.stopping = True
    self.shutdown()  # the accept loop ends
    self.server_close()  # new connections are refused
    deadline = time.monotonic() + timeout
    with self._changed:
      for handler, state in self._state.items():
        if state == 'idle':
          _close_reading(handler.connection)
      while self._state and (left := deadline - time.monotonic()) > 0:
        self._changed.wait(left)
      return sum(state == 'busy' for state in self._state.values())


def _close_reading(conn: socket.socket) -> None:
  """Ends a connection's wait for its next request (what it sends is still sent)."""
  try:
    conn.shutdown(socket.SHUT_RD)
  except OSError:
    pass
