"""Recommendations from a trained run, as CSV or JSON lines.

  python -m gear_jax.recommend --workdir runs/demo [--checkpoint best|latest|STEP]
      [--k 10] [--users all | --users FILE | --user ID,ID | --history FILE]
      [--exclude none|seen|target] [--at TIME] [--output recs.csv|recs.jsonl]

With ``--history FILE`` the histories come from another file in a format the readers
accept; its shoppers need not be in the training data. ``--config.data.*`` flags:
``data.format`` and ``data.csv.*`` describe the ``--history`` file when it differs from
the training file; other keys (e.g. ``data.path`` for a moved data file) apply to the
run's config.json. The library is `gear_jax.recommender` (docs/recommend.md).
"""

from __future__ import annotations

from absl import flags

from gear_jax import cli, serving
from gear_jax.errors import ConfigError, UserError


def define_flags():
  cli.define_config_overrides("Overrides of the run's config.json; data.format / "
                              'data.csv.* describe --history.')
  cli.define_run_flags()
  flags.DEFINE_integer('k', 10, 'Items per user.')
  flags.DEFINE_string('users', 'all', "'all' or a file of raw user ids, one per line.")
  flags.DEFINE_list('user', [], 'Raw user ids, comma separated (instead of --users).')
  flags.DEFINE_string('history', None, 'Interaction file of the shoppers to score '
                      '(any format the readers accept; see --config.data.format).')
  flags.DEFINE_enum('exclude', 'none', list(serving.EXCLUDE),
                    "Items not to recommend: 'seen' (anything in the history), 'target' "
                    '(already bought) or none.')
  flags.DEFINE_string('at', None, "Request time: seconds (the data file's unit), an ISO "
                      "date-time or 'now'; default: right after the last interaction.")
  flags.DEFINE_string('output', None, 'recs.csv or recs.jsonl; default: CSV on stdout.')
  flags.DEFINE_integer('batch_size', serving.BATCH_SIZE, 'Users per scoring step (two '
                       'steps run at once).')


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from gear_jax import hostalloc, recommender
  f = flags.FLAGS
  if f.history and (f.user or f.users != 'all'):
    raise UserError('--history replaces --users / --user; give one of them')
  if f.k < 1:
    raise ConfigError(f'--k must be >= 1, got {f.k}', field='--k')
  recommender.check_output(f.output)
  if f.at is not None:
    recommender.parse_time(f.at)  # a bad --at fails before any work
  users = f.user or (recommender.read_user_ids(f.users) if f.users != 'all' else 'all')
  hostalloc.configure()  # before XLA starts its threads; see gear_jax/hostalloc.py
  overrides = cli.override_values()
  formats = {k: v for k, v in overrides.items()
             if k == 'data.format' or k.startswith('data.csv.')}
  with cli.GracefulStop() as stop:  # checked between batches: a clean stop, no output
    rec = recommender.Recommender.load(
        f.workdir, checkpoint=f.checkpoint, batch_size=f.batch_size,
        overrides={k: v for k, v in overrides.items() if k not in formats})
    hist, source, data_config = recommender.histories_to_score(
        rec, history=f.history, users=users, format_overrides=formats)
    at = (None if f.at is None
          else recommender.parse_time(f.at, recommender.time_divisor(data_config)))
    recommender.write_recommendations(rec, hist, source, k=f.k, exclude=f.exclude, at=at,
                                      output=f.output, stop=stop)


if __name__ == '__main__':
  cli.run(main, define_flags)
