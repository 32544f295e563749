"""Non-learned baselines scored by the trainer's exact protocol, as run directories.

  python -m gear_jax.baselines --config configs/demo.py --workdir runs/baselines

Scores the held-out cases of the config's data with the same split, negatives (the
same cache), protocols and metrics as `gear_jax.train`:
  popularity   items ranked by their count in the training interactions
  transition   items ranked by how often they follow the case's previous interaction's
               item in the training data (first-order item transitions inside each
               user's history), popularity breaking ties
Each baseline is written as a run directory, <workdir>/<name>/, holding config.json
(`model.name` = the baseline), metrics.jsonl (one row, epoch 0) and summary.json in the
trainer's shape (best_val, test with data.split='val_test', num_params 0,
epochs_run 0), so that `python -m gear_jax.report --workdir runs/gear
runs/baselines/popularity runs/baselines/transition --output cmp` puts them in one
table with trained runs. A sequence model that does not beat these has learned nothing
about sequences.
The scoring is `gear_jax.heuristics`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from gear_jax import cli


def define_flags():
  cli.define_config_file()
  cli.define_run_flags("Directory for the baselines' run directories.", checkpoint=False)


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from gear_jax import heuristics
  config = cli.config_from_flag()
  paths = heuristics.write_runs(config, flags.FLAGS.workdir)
  monitor = config.eval.monitor
  for name, path in paths.items():
    with open(os.path.join(path, 'summary.json')) as f:
      val = json.load(f)['best_val']
    shown = dict.fromkeys(['val/Recall@10', 'val/NDCG@10', monitor])
    print(f'{name:<11} ' + '  '.join(f'{k} {val.get(k, float("nan")):.4f}' for k in shown)
          + f'  -> {path}')
  sys.stdout.flush()


if __name__ == '__main__':
  cli.run(main, define_flags)
