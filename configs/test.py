"""A tiny configuration for the tests (and a 30-second smoke run).

Command:
  python -m gear_jax.train --config configs/test.py --workdir runs/test
Data: the synthetic 'test' preset (300 users, 150 items), generated on first use at
data/synthetic_test.txt. Expected: runs 3 epochs in well under a minute on a CPU; the
metric is not meaningful at this size.
"""

from gear_jax.defaults import get_default_config


def get_config(model: str = 'gear'):
  config = get_default_config(model)
  config.seed = 0
  config.data.path = 'data/synthetic_test.txt'
  config.data.synthetic.enabled = True
  config.data.synthetic.num_users = 300
  config.data.synthetic.num_items = 150
  config.data.max_len = 12
  config.data.threads = 1
  config.model.d_model = 8
  config.model.n_layer = 1
  config.model.dropout = 0.1
  config.train.batch_size = 32
  config.train.num_epochs = 3
  config.train.patience = 5
  config.train.log_every = 5
  config.eval.batch_size = 64
  config.eval.num_negatives = 20
  config.eval.ks = (1, 5, 10)
  config.eval.full_chunk = 64
  # gear_jax.tune: a space of two small settings, so a trial takes seconds
  config.tune.space = ('model.d_model: choice(8, 16)', 'train.lr: loguniform(3e-4, 1e-2)')
  config.tune.startup_trials = 2
  config.tune.warmup_epochs = 1
  return config
