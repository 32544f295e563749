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

import os
import sys
import time

from absl import flags

from gear_jax import cli, serving
from gear_jax.errors import ConfigError, UserError


def define_flags():
  from gear_jax import exporter
  cli.define_config_overrides("Overrides of the run's config.json (e.g. data.path).")
  cli.define_run_flags()
  flags.DEFINE_string('output', None, 'Artifact path, e.g. model.jaxexport.')
  flags.DEFINE_integer('k', 100, 'Items per request the artifact returns (clients may '
                       'use fewer).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'],
                    f'Lowered for these, of {exporter.PLATFORMS}.')
  flags.mark_flag_as_required('output')


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from gear_jax import exporter, hostalloc, recommender
  f = flags.FLAGS
  bad = [p for p in f.platforms if p not in exporter.PLATFORMS]
  if bad or not f.platforms:
    raise ConfigError(f'--platforms {",".join(f.platforms)}: use some of '
                      f'{exporter.PLATFORMS}', field='--platforms')
  if f.k < 1:
    raise ConfigError(f'--k must be >= 1, got {f.k}', field='--k')
  recommender.check_output(f.output, formats=None)
  if os.path.isdir(serving.sidecar_path(f.output)):
    raise UserError(f'{serving.sidecar_path(f.output)} is a directory')
  hostalloc.configure()  # before XLA starts its threads; see gear_jax/hostalloc.py
  start = time.perf_counter()
  with cli.GracefulStop() as stop:
    rec = recommender.Recommender.load(f.workdir, checkpoint=f.checkpoint,
                                       overrides=cli.override_values())
    info = exporter.export_recommender(rec, f.output, k=f.k, platforms=tuple(f.platforms),
                                       stop=stop)
  size = os.path.getsize(f.output) / 2**20
  print(f'exported checkpoint step {rec.step} (epoch {info["source"]["epoch"]}) of '
        f'{f.workdir}: top {info["k"]} of {rec.vocab.num_items:,} items, platforms '
        f'{", ".join(info["platforms"])}, {time.perf_counter() - start:.1f}s\n'
        f'  {f.output} ({size:.1f} MB)\n  {serving.sidecar_path(f.output)}\n'
        f"load with: gear_jax.serving.load({f.output!r})", file=sys.stderr, flush=True)


if __name__ == '__main__':
  cli.run(main, define_flags)
