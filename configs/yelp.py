"""GEAR on Yelp with the published hyper-parameters.

Command:
  python -m gear_jax.train --config configs/yelp.py --workdir runs/yelp
Data: data/yelp.txt in the reference format with behaviors tip, neg, neutral, pos (the
target); 19,800 users / 22,734 items after preprocessing.
Expected: sampled Val NDCG@10 in the range the paper reports for yelp. Runtime: a few
seconds per epoch on a GPU, under a minute per epoch on a laptop CPU.
"""

from gear_jax.defaults import get_default_config


def get_config(model: str = 'gear'):
  config = get_default_config(model)
  config.data.path = 'data/yelp.txt'
  config.data.behaviors = ('tip', 'neg', 'neutral', 'pos')
  config.data.target = 'pos'
  config.model.d_model = 16
  config.model.n_layer = 2
  config.model.dropout = 0.1
  config.train.num_epochs = 500
  config.eval.other_protocol = True
  return config
