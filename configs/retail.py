"""GEAR on Tmall "retail" with the published hyper-parameters (the defaults).

Command:
  python -m gear_jax.train --config configs/retail.py --workdir runs/retail
  python -m gear_jax.train --config configs/retail.py:sasrec --workdir runs/sasrec_retail
Data: data/retail.txt in the reference format (user item behavior timestamp, tab
separated); 147,894 users / 99,037 items after preprocessing.
Expected: best sampled Val NDCG@10 about 0.72 (published 0.7244 at epoch 145 of 176,
early stopping with patience 30). Runtime: about 1 minute per epoch on an RTX 4090 for
the reference; see docs/performance.md for gear_jax on GPU and CPU.
The ':sasrec' variant is SASRec (Kang and McAuley 2018: 2 blocks, 1 head, dropout 0.2,
padding hidden, learned positions, tied item head) at GEAR's width, window, data,
negatives, loss, Adam recipe and early stopping: the baseline papers compare GEAR with.
"""

from gear_jax.defaults import get_default_config


def get_config(model: str = 'gear'):
  config = get_default_config(model)
  config.data.path = 'data/retail.txt'  # tab separated, no header
  config.train.num_epochs = 500  # a ceiling: early stopping (patience 30) ends the run
  config.eval.other_protocol = True  # also report full-catalogue ranking (val_full/...)
  return config
