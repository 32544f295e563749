"""A serving artifact: the trained recommender as a `jax.export` program.

  python -m gear_jax.export --workdir runs/demo --output model.jaxexport
      [--checkpoint best|latest|STEP] [--k 100] [--platforms cpu,cuda]

Writes two files, each atomically (a complete file under its name, or the old one):
- ``model.jaxexport``: the serialised StableHLO of
  ``(items, behaviors, gaps [B, L] int32, exclude [B, H] int32) -> (scores [B, k] f32,
  item ids [B, k] int32)`` for any B and H, lowered for every platform in
  ``--platforms``, the parameters baked in as constants;
- ``model.jaxexport.vocab.json``: raw item and user ids, behavior names, L, k, where
  the model came from, and the artifact's content hash (a sidecar from another export
  is refused when loading).
`gear_jax.serving.load('model.jaxexport')` loads both with jax and numpy only.
"""

from __future__ import annotations

import json
import os
import sys
import time

from gear_jax import cli, serving
from gear_jax.errors import ConfigError, Interrupted, UserError

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def export_recommender(rec, path: str, *, k: int = 100,
                       platforms: tuple[str, ...] = ('cpu', 'cuda'), stop=None) -> dict:
  """Serialises `rec`'s scoring function (a `gear_jax.Recommender`) to `path` and its
  sidecar; returns the sidecar's content. `stop` (a `cli.GracefulStop`) is checked
  before anything is written; once writing starts, both files are completed."""
  import jax
  import jax.numpy as jnp
  from gear_jax import atomic, steps
  k = rec.clamp_k(k)
  params, model = rec.params, rec.model

  def serve(items, behaviors, gaps, exclude):
    batch = dict(items=items, behaviors=behaviors, gaps=gaps, exclude=exclude)
    return steps.recommend_step(params, batch, model=model, k=k)

  b, h = jax.export.symbolic_shape('b, h')
  window = jax.ShapeDtypeStruct((b, rec.vocab.max_len), jnp.int32)
  exported = jax.export.export(jax.jit(serve), platforms=platforms)(
      window, window, window, jax.ShapeDtypeStruct((b, h), jnp.int32))
  data = bytes(exported.serialize())
  info = dict(
      format=serving.FORMAT, artifact=os.path.basename(path),
      artifact_digest=serving.digest(data), k=k, platforms=list(exported.platforms),
      inputs=dict(items='[B, L] int32 dense item ids, 0 = padding',
                  behaviors='[B, L] int32 behavior ids, the last one the target',
                  gaps='[B, L] int32 seconds since the previous interaction',
                  exclude='[B, H] int32 item ids not to return, 0 = none'),
      outputs=dict(scores='[B, k] float32, descending', items='[B, k] int32 dense ids'),
      vocab=rec.vocab.to_json(),
      source=dict(workdir=os.path.abspath(rec.workdir), checkpoint=rec.step,
                  epoch=rec.meta.get('epoch'), data_path=rec.config.data.path,
                  data_key=rec.data.key),
      created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      jax_version=jax.__version__)
  if stop is not None and stop.requested:
    raise Interrupted(stop.signum, f'interrupted: {path} was not written')
  # the artifact first: a crash between the two leaves a sidecar whose hash refuses it
  with atomic.atomic_write(path) as f:
    f.write(data)
  with atomic.atomic_write(serving.sidecar_path(path), 'w') as f:
    json.dump(info, f)
  return info


# -- the CLI ------------------------------------------------------------------------------

def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  from gear_jax import defaults
  config_flags.DEFINE_config_dict('config', defaults.get_default_config(),
                                  "Overrides of the run's config.json (e.g. data.path).")
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/).')
  flags.DEFINE_string('output', None, 'Artifact path, e.g. model.jaxexport.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_integer('k', 100, 'Items per request the artifact returns (clients may '
                       'use fewer).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'], f'Lowered for these, of {PLATFORMS}.')
  flags.mark_flags_as_required(['workdir', 'output'])


@cli.main
def main(argv):
  from absl import app, flags
  from ml_collections import config_flags

  from gear_jax import recommend
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  bad = [p for p in f.platforms if p not in PLATFORMS]
  if bad or not f.platforms:
    raise ConfigError(f'--platforms {",".join(f.platforms)}: use some of {PLATFORMS}',
                      field='--platforms')
  if f.k < 1:
    raise ConfigError(f'--k must be >= 1, got {f.k}', field='--k')
  recommend.check_output(f.output, formats=None)
  if os.path.isdir(serving.sidecar_path(f.output)):
    raise UserError(f'{serving.sidecar_path(f.output)} is a directory')
  from gear_jax import hostalloc
  hostalloc.configure()  # before XLA starts its threads; see gear_jax/hostalloc.py
  start = time.perf_counter()
  with cli.GracefulStop() as stop:
    rec = recommend.Recommender.load(
        f.workdir, checkpoint=f.checkpoint,
        overrides=config_flags.get_override_values(f['config']))
    info = export_recommender(rec, f.output, k=f.k, platforms=tuple(f.platforms),
                              stop=stop)
  size = os.path.getsize(f.output) / 2**20
  print(f'exported checkpoint step {rec.step} (epoch {info["source"]["epoch"]}) of '
        f'{f.workdir}: top {info["k"]} of {rec.vocab.num_items:,} items, platforms '
        f'{", ".join(info["platforms"])}, {time.perf_counter() - start:.1f}s\n'
        f'  {f.output} ({size:.1f} MB)\n  {serving.sidecar_path(f.output)}\n'
        f"load with: gear_jax.serving.load({f.output!r})", file=sys.stderr, flush=True)


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
