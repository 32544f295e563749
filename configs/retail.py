"""GEAR on Tmall "retail" with the published hyper-parameters.

Command:
  python -m gear_jax.train --config configs/retail.py --workdir runs/retail
Data: data/retail.txt in the reference format (user item behavior timestamp, tab
separated); 147,894 users / 99,037 items after preprocessing.
Expected: best sampled Val NDCG@10 about 0.72 (published 0.7244 at epoch 145 of 176,
early stopping with patience 30). Runtime: about 1 minute per epoch on an RTX 4090 for
the reference; see README "Performance" for gear_jax on GPU and CPU.
"""

from gear_jax.defaults import get_default_config


def get_config():
  config = get_default_config()
  config.seed = 42
  config.data.path = 'data/retail.txt'  # tab separated, no header
  config.data.format = 'tsv'
  config.data.behaviors = ('pv', 'fav', 'cart', 'buy')
  config.data.target = 'buy'
  config.data.max_len = 50
  config.model.d_model = 32
  config.model.n_head = 2
  config.model.n_layer = 4
  config.model.dropout = 0.2
  config.train.batch_size = 128
  config.train.num_epochs = 500  # a ceiling: early stopping (patience 30) ends the run
  config.train.patience = 30
  config.train.lr = 1e-3
  config.train.weight_decay = 1e-6
  config.train.alpha = 0.1
  config.eval.protocol = 'sampled'  # 1 + 99 candidates, comparable with the paper
  config.eval.other_protocol = True  # also report full-catalogue ranking (val_full/...)
  return config
