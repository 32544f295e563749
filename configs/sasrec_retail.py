"""SASRec on Tmall "retail": the baseline multi-behavior papers compare GEAR with.

Command:
  python -m gear_jax.train --config configs/sasrec_retail.py --workdir runs/sasrec_retail
Data: data/retail.txt as in configs/retail.py (same preprocessing, split, negatives and
metrics; the model reads every interaction's item and ignores behaviors and times).
Model: the usual SASRec settings (Kang and McAuley 2018: 2 blocks, 1 head, dropout 0.2,
padding hidden from attention, learned positions, tied item head) at GEAR's width
(d_model 32) and window (L = 50), trained with the same full-softmax cross-entropy,
Adam recipe and early stopping on val NDCG@10 as GEAR.
"""

from gear_jax.defaults import get_default_config


def get_config():
  config = get_default_config()
  config.seed = 42
  config.data.path = 'data/retail.txt'  # as configs/retail.py
  config.data.format = 'tsv'
  config.data.behaviors = ('pv', 'fav', 'cart', 'buy')
  config.data.target = 'buy'
  config.data.max_len = 50
  config.model.name = 'sasrec'
  config.model.d_model = 32
  config.model.n_head = 1
  config.model.n_layer = 2
  config.model.dropout = 0.2
  config.model.mask_padding = True
  config.train.batch_size = 128
  config.train.num_epochs = 500  # a ceiling: early stopping (patience 30) ends the run
  config.train.patience = 30
  config.train.lr = 1e-3
  config.train.weight_decay = 1e-6
  config.eval.protocol = 'sampled'
  config.eval.other_protocol = True
  return config
