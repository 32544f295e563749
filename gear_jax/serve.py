"""An HTTP endpoint for a serving artifact.

  python -m gear_jax.serve --artifact model.jaxexport [--port 8080] [--host 127.0.0.1]
      [--max_batch 128] [--max_wait_ms 0] [--workers 2] [--compile_cache DIR]
      [--log_requests]

POST /recommend, GET /health, GET /metadata (the library is `gear_jax.server`;
docs/serving.md). Every bucket is compiled before the port opens; then one line on
stderr names the URL. SIGTERM or SIGINT: no new connections, requests already received
are answered, then exit 143 / 130 (128 + the signal, as every gear_jax command); a
second signal exits at once.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from gear_jax import cli
from gear_jax.errors import ConfigError, Interrupted, UserError


def define_flags():
  from gear_jax import serving
  flags.DEFINE_string('artifact', None, 'model.jaxexport written by gear_jax.export '
                      '(its .vocab.json beside it).')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every '
                      'interface).')
  flags.DEFINE_integer('port', 8080, 'Port (0: a free one, named in the startup line).')
  flags.DEFINE_integer('max_batch', serving.BATCH_SIZE, 'The most shoppers one call '
                       'scores (the largest bucket).')
  flags.DEFINE_float('max_wait_ms', 0.0, 'How long a batch waits for more concurrent '
                     'requests (0: a lone request never waits).')
  flags.DEFINE_integer('workers', 2, 'Batches scored at once.')
  flags.DEFINE_integer('max_body_kb', 1024, 'Largest request body accepted.')
  flags.DEFINE_float('drain_s', 30.0, 'On SIGTERM, how long in-flight requests may '
                     'take.')
  flags.DEFINE_string('compile_cache', None, "Directory for the compiled buckets (JAX's "
                      'persistent compilation cache): a restart with the same artifact '
                      'and buckets reads them instead of compiling again.')
  flags.DEFINE_bool('log_requests', False, 'One access-log line per request on stderr.')
  flags.mark_flag_as_required('artifact')


@cli.main
def main(argv):
  cli.no_arguments(argv)
  f = flags.FLAGS
  for name in ('max_batch', 'workers', 'max_body_kb'):
    if f[name].value < 1:
      raise ConfigError(f'must be >= 1, got {f[name].value}', field=f'--{name}')
  if f.max_wait_ms < 0:
    raise ConfigError(f'must be >= 0, got {f.max_wait_ms}',
                      field='--max_wait_ms')
  # no hostalloc.configure(), unlike training: with a single malloc arena
  # (MALLOC_ARENA_MAX=1) 16 clients got 472-502 requests/s at 99,037 items, 499-673
  # without it (alternated, 2026-12-03)
  if f.compile_cache:
    # 99,037 items, 8 buckets: 15-18 s compiling, 2.3 s from the cache (~22 MB a
    # bucket: the catalogue is a constant of the program), 2026-12-03
    try:
      os.makedirs(f.compile_cache, exist_ok=True)
    except OSError as e:
      raise UserError(f'cannot create --compile_cache {f.compile_cache}: '
                      f'{e.strerror or e}') from None
    import jax
    jax.config.update('jax_compilation_cache_dir', f.compile_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from gear_jax import serving, server
  with cli.GracefulStop('no new connections; answering the requests received') as stop:
    start = time.perf_counter()
    try:
      model = serving.load(f.artifact, max_batch=f.max_batch, max_wait_ms=f.max_wait_ms,
                           workers=f.workers)
    except (OSError, ValueError) as e:
      raise UserError(f'cannot load --artifact {f.artifact}: {e}') from None
    model.notify = lambda message: None  # a request's notices are not the log's
    warm = model.warmup()
    try:
      http = server.Server(model, f.host, f.port, artifact=os.path.abspath(f.artifact),
                           log_requests=f.log_requests, max_body=f.max_body_kb << 10)
    except OSError as e:
      raise UserError(f'cannot listen on {f.host}:{f.port}: {e.strerror or e}',
                      hint='choose another --port (0: a free one)') from None
    http.start()
    print(f'serving {http.url} (POST /recommend, GET /health, /metadata): '
          f'{f.artifact}, {model.vocab.num_items:,} items, top <= {model.max_k}, buckets '
          f'{"/".join(map(str, model.buckets))}, max wait {f.max_wait_ms:g} ms; '
          f'loaded and compiled in {time.perf_counter() - start:.1f}s '
          f'({warm:.1f}s compiling)', file=sys.stderr, flush=True)
    while not stop.requested:
      time.sleep(0.1)
    left = http.drain(f.drain_s)
  raise Interrupted(stop.signum, f'stopped: {http.served:,} requests answered'
                    + (f', {left} still unanswered after {f.drain_s:g}s' if left else ''))


if __name__ == '__main__':
  cli.run(main, define_flags)
