"""The quality benchmark: tests/data/markov3k with the reference's small config.

Command (from the repository root; data.path is relative to the current directory):
  python -m gear_jax.train --config configs/markov3k.py --workdir runs/markov3k
Data: 3,000 users / 500 items whose buys follow item-to-item transitions, so item
popularity scores only 0.098 sampled NDCG@10 and the model must learn the sequence.
Expected: best sampled Val NDCG@10 over 40 epochs about 0.55 (reference 0.5494);
runtime about a minute on a 2-core CPU (the reference takes 157 s).
"""

from gear_jax.defaults import get_default_config


def get_config(model: str = 'gear'):
  config = get_default_config(model)
  config.data.path = 'tests/data/markov3k/retail.txt.gz'  # tests/data/README.md
  config.data.max_len = 20
  config.model.n_layer = 2
  config.train.batch_size = 32
  config.train.num_epochs = 40
  config.train.patience = 40
  return config
