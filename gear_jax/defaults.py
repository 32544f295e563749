"""The default configuration (every key, one comment each) and its validation.

Config files in ``configs/`` start from `get_default_config()` and override what they
need; any key can be overridden on the command line (``--config.model.d_model=64``).
"""

from __future__ import annotations

import ml_collections

from gear_jax.errors import ConfigError


def get_default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42  # parameters, dropout, data order and negatives all derive from it

  c.data = d = ml_collections.ConfigDict()
  d.path = 'data/retail.txt'  # the raw interaction file
  d.format = 'tsv'  # 'tsv' (reference: user item behavior timestamp), 'taobao', 'csv'
  d.behaviors = ('pv', 'fav', 'cart', 'buy')  # behavior names, in id order 1..n_b
  d.target = 'buy'  # the behavior to predict (and hold out)
  d.multi_behavior = True  # False keeps only the target behavior
  d.min_uc = 3  # drop users with fewer interactions
  d.split = 'val'  # 'val' (reference leave-one-out) or 'val_test' (see README)
  d.max_len = 50  # L: window length (the model reads L - 1 items and L behaviors)
  d.cache = True  # cache preprocessing and negatives on disk
  d.cache_dir = ''  # '' = $GEAR_JAX_CACHE or ~/.cache/gear_jax
  d.threads = 2  # grain prefetch threads
  d.csv = ml_collections.ConfigDict()  # only for format='csv'
  d.csv.delimiter = ','
  d.csv.header = True  # the first line names the columns
  d.csv.columns = ml_collections.ConfigDict(  # header names or 0-based positions
      dict(user='user', item='item', behavior='behavior', timestamp='timestamp'))
  d.csv.behavior_map = ''  # raw:name pairs, e.g. 'view:pv,addtocart:cart,transaction:buy'
  d.csv.timestamp_unit = 's'  # 's' or 'ms'
  d.synthetic = ml_collections.ConfigDict()  # generate data.path if it is missing
  d.synthetic.enabled = False
  d.synthetic.num_users = 0
  d.synthetic.num_items = 0
  d.synthetic.seed = 0
  d.synthetic.preset = ''  # a generator preset's knobs ('demo': goal sessions), sizes above

  c.model = m = ml_collections.ConfigDict()
  m.name = 'gear'  # 'gear' or 'sasrec' (item sequence only; see gear_jax/sasrec.py)
  m.d_model = 32  # embedding and hidden width
  m.n_head = 2  # attention heads (time-bias slopes 2^(-8h/H))
  m.n_layer = 4  # upper transformer blocks
  m.dropout = 0.2  # everywhere (embeddings, attention weights, residuals, FFN)
  m.mask_padding = False  # True hides padded positions from attention (not reference)
  m.precision = 'float32'  # 'float32' (highest matmul precision), 'default', 'bfloat16'
  m.kernels = 'auto'  # attention/FFN: 'cpu' (tuned custom VJPs), 'xla' (plain), 'auto'

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 128  # sequences per optimizer micro-step (global, all devices)
  t.grad_accum = 1  # micro-steps per optimizer update (ijcai: 4)
  t.num_epochs = 200  # maximum epochs; early stopping usually ends sooner
  t.patience = 30  # epochs without a new best monitored metric before stopping
  t.lr = 1e-3  # Adam learning rate
  t.weight_decay = 1e-6  # PyTorch-style L2 added to the gradient before Adam
  t.alpha = 0.1  # weight of the behavior-prediction loss
  t.loss = 'auto'  # item loss: 'auto', 'token' / 'vocab' chunks, or 'dense' logits
  t.loss_memory_mb = 0  # budget (MB) for one chunk of item-head logits; 0 = auto
  t.deterministic_ops = True  # GPU: XLA's deterministic scatter-adds (False: faster)
  t.log_every = 100  # steps between loss fetches (progress, TensorBoard)

  c.eval = e = ml_collections.ConfigDict()
  e.protocol = 'sampled'  # 'sampled' (1 + num_negatives candidates) or 'full' (catalogue)
  e.other_protocol = False  # also compute the other protocol (reported as val_full/...)
  e.monitor = 'val/NDCG@10'  # early-stopping metric (mode max)
  e.negatives = 'random'  # 'random' (reference, uniform) or 'popularity'
  e.num_negatives = 99
  e.batch_size = 256  # evaluation users per step (1024 is no faster on CPU, needs more memory)
  e.ks = (1, 5, 10, 20, 50)  # cut-offs of Recall@K and NDCG@K
  e.full_chunk = 16384  # items per chunk in full-catalogue ranking

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the batch axis (-1: all devices / model)
  c.mesh.model = 1  # devices sharing the item table (with shard_items)
  c.mesh.shard_items = False  # shard the item embedding / item head over 'model'

  c.distributed = ml_collections.ConfigDict()  # multi-host (see README, Scaling)
  c.distributed.coordinator = ''  # host:port; '' = single process or from the env
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def flat_config(config) -> dict:
  """{'model.d_model': 32, ...} of a ConfigDict or a plain nested dict."""
  out = {}
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  walk(config if isinstance(config, dict) else config.to_dict(), '')
  return out


_CHOICES = {
    'data.format': ('tsv', 'taobao', 'csv'),
    'data.split': ('val', 'val_test'),
    'model.name': ('gear', 'sasrec'),
    'model.precision': ('float32', 'default', 'bfloat16'),
    'model.kernels': ('auto', 'xla', 'cpu'),
    'train.loss': ('auto', 'token', 'vocab', 'dense'),
    'eval.protocol': ('sampled', 'full'),
    'eval.negatives': ('random', 'popularity'),
}


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def validate_config(config) -> None:
  """Fails early, before any data is read or anything is compiled."""
  for key, choices in _CHOICES.items():
    if _get(config, key) not in choices:
      raise ConfigError(f'{_get(config, key)!r} is not one of {choices}',
                        field=f'config.{key}')
  positive = ['data.max_len', 'data.min_uc', 'model.d_model', 'model.n_head',
              'model.n_layer', 'train.batch_size', 'train.grad_accum', 'train.patience',
              'eval.batch_size', 'eval.num_negatives', 'eval.full_chunk']
  for key in positive:
    if int(_get(config, key)) < 1:
      raise ConfigError(f'must be >= 1, got {_get(config, key)}', field=f'config.{key}')
  if config.data.max_len < 2:
    raise ConfigError('max_len must be >= 2', field='config.data.max_len')
  if config.model.d_model % config.model.n_head:
    raise ConfigError(f'd_model {config.model.d_model} is not divisible by n_head '
                      f'{config.model.n_head}', field='config.model.d_model')
  if not 0.0 <= config.model.dropout < 1.0:
    raise ConfigError('dropout must be in [0, 1)', field='config.model.dropout')
  preset = config.data.synthetic.get('preset', '')
  if preset:
    from gear_jax.data import synthetic
    synthetic.preset_knobs(preset)  # ConfigError naming config.data.synthetic.preset
  if float(config.train.loss_memory_mb) < 0:
    raise ConfigError('must be >= 0 (0 = sized from the device)',
                      field='config.train.loss_memory_mb')
  if config.train.num_epochs < 0:
    raise ConfigError('num_epochs must be >= 0', field='config.train.num_epochs')
  monitor = config.eval.monitor
  prefix, _, name = monitor.partition('/')
  other = 'val_full' if config.eval.protocol == 'sampled' else 'val_sampled'
  known = ['MRR'] + [f'{m}@{k}' for k in config.eval.ks for m in ('Recall', 'NDCG')]
  if (prefix not in ('val', other) or name not in known
      or (prefix == other and not config.eval.other_protocol)):
    raise ConfigError(f'monitor {monitor!r} is not a computed validation metric; use '
                      f"'val/<metric>' with <metric> one of {known}"
                      + (f", or '{other}/<metric>' with eval.other_protocol=True"),
                      field='config.eval.monitor')

