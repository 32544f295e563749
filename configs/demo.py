"""The demo: GEAR on a synthetic multi-behavior data set made by the package, offline.

Command:
  python -m gear_jax.train --config configs/demo.py --workdir runs/demo
  python -m gear_jax.train --config configs/demo.py:sasrec --workdir runs/demo_sasrec
Data: the synthetic 'demo' preset (4,000 users, 1,500 items, goal sessions: a session
views neighbours of a goal item, carts the goal, wanders to other categories and buys
it minutes later; decoy carts, repeated views and favourites, old carts seldom bought;
see gear_jax/data/synthetic.py), generated on first use at data/synthetic_demo_goals.txt
(a second or so).
Expected: sampled Val NDCG@10 about 0.80 after 30 epochs, against 0.65 for SASRec on
the same data (the ':sasrec' variant), 0.32 for first-order item transitions and 0.21
for popularity (python -m gear_jax.baselines). Runtime: about 3 minutes on a quiet
2-core CPU.
"""

from gear_jax.defaults import get_default_config


def get_config(model: str = 'gear'):
  config = get_default_config(model)  # the published recipe, d_model 32
  config.data.path = 'data/synthetic_demo_goals.txt'
  config.data.synthetic.enabled = True  # generate data.path when it is missing
  config.data.synthetic.preset = 'demo'  # goal sessions
  config.data.synthetic.num_users = 4000
  config.data.synthetic.num_items = 1500
  config.model.n_layer = 2
  config.train.batch_size = 64
  config.train.num_epochs = 30  # patience 30: the first epochs sit at the popularity level
  config.eval.other_protocol = True  # also full-catalogue ranking (val_full/...)
  if model == 'gear':  # gear_jax.tune: the default space, capped at d_model 64 / 4 layers
    config.tune.space = ('model.d_model: choice(32, 64)', 'model.n_head: choice(1, 2, 4)',
                         'model.n_layer: choice(1, 2, 4)',
                         'model.dropout: uniform(0.0, 0.4)',
                         'train.lr: loguniform(1e-4, 3e-3)', 'train.alpha: uniform(0.0, 0.5)')
  return config
