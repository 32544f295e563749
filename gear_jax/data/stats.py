"""Data set statistics after GEAR preprocessing.

  python -m gear_jax.data.stats --config configs/retail.py --config.data.path=FILE [--json]

Counts are taken AFTER behavior selection, the min_uc filter and the split. `--json`
prints one JSON object (num_users, num_items, num_interactions, num_val_users,
num_test_users in val_test, behavior_counts, seq_len statistics, preprocess_seconds,
...). `--no_cache` times a fresh parse instead of loading the cache.
"""

from __future__ import annotations

import json

from absl import flags

from gear_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_file()
  flags.DEFINE_bool('json', False, 'Print one JSON object.')
  flags.DEFINE_bool('no_cache', False, 'Parse and preprocess afresh (no cache read '
                    'or write).')
  flags.DEFINE_bool('negatives', False, 'Also sample (or load) the validation '
                    'negatives and time them.')


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from gear_jax.data import statistics
  stats = statistics.compute(cli.config_from_flag(), use_cache=not FLAGS.no_cache,
                             with_negatives=FLAGS.negatives)
  if FLAGS.json:
    print(json.dumps(stats))
  else:
    statistics.print_table(stats)


if __name__ == '__main__':
  cli.run(main, define_flags)
