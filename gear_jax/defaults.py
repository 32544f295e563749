"""Every config key, declared once: its default, its allowed values, whether a resumed
run may change it, and one line of documentation (`KEYS`).

`get_default_config` builds the ConfigDict from the table; `validate_config` checks a
config against it (plus the few rules that relate keys); the trainer's resume check
reads `resumable`; docs/configs.md holds `markdown_table()`'s output (a test keeps the
two equal). `load_config` is the one way to load a config file with overrides, for the
command lines (through `gear_jax.cli`), the scripts and the tests alike.

Config files in ``configs/`` start from ``get_default_config(model)`` and set what
differs; ``configs/X.py:sasrec`` is the variant of a file for another registered model
(its ``get_config(model)`` receives the name). Any key can be overridden on the command
line (``--config.model.d_model=64``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from gear_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key."""
  name: str  # dotted, e.g. 'model.d_model'
  default: Any
  doc: str
  choices: tuple | Callable[[], tuple] | None = None  # allowed values (or a function)
  minimum: float | None = None  # smallest allowed value
  resumable: bool = False  # a resumed run may change it (how, not what, is computed)

  def allowed(self) -> tuple | None:
    return self.choices() if callable(self.choices) else self.choices


def _model_names() -> tuple:
  from gear_jax.models import registry  # no JAX: the registry imports models lazily
  return registry.names()


_CSV_COLUMNS = ('user', 'item', 'behavior', 'timestamp')

# The search space of gear_jax.tune for each model (docs/tuning.md): 'key: distribution'
# entries; a model without its own (a registered one) gets the SASRec space, which
# names no GEAR-only key.
_SEQUENCE_SPACE = ('model.d_model: choice(32, 64, 128)', 'model.n_head: choice(1, 2, 4)',
                   'model.n_layer: choice(1, 2, 4, 6)', 'model.dropout: uniform(0.0, 0.4)',
                   'train.lr: loguniform(1e-4, 3e-3)')
TUNE_SPACES: dict[str, tuple[str, ...]] = {
    'gear': _SEQUENCE_SPACE + ('train.alpha: uniform(0.0, 0.5)',),
    'sasrec': _SEQUENCE_SPACE,
}

KEYS: tuple[Key, ...] = (
    Key('seed', 42, 'parameters, dropout, data order and negatives all derive from it'),
    # -- data
    Key('data.path', 'data/retail.txt', 'the raw interaction file', resumable=True),
    Key('data.format', 'tsv', "'tsv' (reference: user item behavior timestamp), "
        "'taobao', 'csv'", choices=('tsv', 'taobao', 'csv')),
    Key('data.behaviors', ('pv', 'fav', 'cart', 'buy'), 'behavior names, in id order 1..n_b'),
    Key('data.target', 'buy', 'the behavior to predict (and hold out)'),
    Key('data.multi_behavior', True, 'False keeps only the target behavior'),
    Key('data.min_uc', 3, 'drop users with fewer interactions', minimum=1),
    Key('data.split', 'val', "'val' (reference leave-one-out) or 'val_test' (docs/data.md)",
        choices=('val', 'val_test')),
    Key('data.max_len', 50, 'L: window length (the model reads L - 1 items and L behaviors)',
        minimum=2),
    Key('data.cache', True, 'cache preprocessing and negatives on disk', resumable=True),
    Key('data.cache_dir', '', "'' = $GEAR_JAX_CACHE or ~/.cache/gear_jax", resumable=True),
    Key('data.threads', 2, 'grain prefetch threads', resumable=True),
    Key('data.csv.delimiter', ',', "only for format='csv'"),
    Key('data.csv.header', True, 'the first line names the columns'),
    *(Key(f'data.csv.columns.{c}', c, 'header name or 0-based position of the column')
      for c in _CSV_COLUMNS),
    Key('data.csv.behavior_map', '', "raw:name pairs, e.g. "
        "'view:pv,addtocart:cart,transaction:buy'"),
    Key('data.csv.timestamp_unit', 's', "'s' or 'ms'"),
    Key('data.synthetic.enabled', False, 'generate data.path if it is missing',
        resumable=True),
    Key('data.synthetic.num_users', 0, 'users of the generated data set'),
    Key('data.synthetic.num_items', 0, 'items of the generated data set'),
    Key('data.synthetic.seed', 0, 'seed of the generator'),
    Key('data.synthetic.preset', '', "a generator preset's knobs ('demo': goal sessions), "
        'sizes above'),
    # -- model
    Key('model.name', 'gear', "a registered model: 'gear', 'sasrec' (item sequence only)",
        choices=_model_names),
    Key('model.d_model', 32, 'embedding and hidden width', minimum=1),
    Key('model.n_head', 2, 'attention heads (time-bias slopes 2^(-8h/H))', minimum=1),
    Key('model.n_layer', 4, 'upper transformer blocks', minimum=1),
    Key('model.dropout', 0.2, 'everywhere (embeddings, attention weights, residuals, FFN); '
        'in [0, 1)'),
    Key('model.mask_padding', False, 'True hides padded positions from attention '
        '(not reference)'),
    Key('model.precision', 'float32', "'float32' (highest matmul precision), 'default', "
        "'bfloat16'", choices=('float32', 'default', 'bfloat16')),
    Key('model.kernels', 'auto', "attention/FFN: 'cpu' (tuned custom VJPs), 'xla' (plain), "
        "'auto' (cpu on the CPU)", choices=('auto', 'xla', 'cpu'), resumable=True),
    # -- train
    Key('train.batch_size', 128, 'sequences per optimizer micro-step (global, all devices)',
        minimum=1),
    Key('train.grad_accum', 1, 'micro-steps per optimizer update (ijcai: 4)', minimum=1),
    Key('train.num_epochs', 200, 'maximum epochs; early stopping usually ends sooner',
        minimum=0, resumable=True),
    Key('train.patience', 30, 'epochs without a new best monitored metric before stopping',
        minimum=1, resumable=True),
    Key('train.lr', 1e-3, 'Adam learning rate'),
    Key('train.weight_decay', 1e-6, 'PyTorch-style L2 added to the gradient before Adam'),
    Key('train.alpha', 0.1, 'weight of the behavior-prediction loss'),
    Key('train.loss', 'auto', "item loss: 'auto', 'token' / 'vocab' chunks, or 'dense' "
        'logits', choices=('auto', 'token', 'vocab', 'dense')),
    Key('train.loss_memory_mb', 0, 'budget (MB) for one chunk of item-head logits; '
        '0 = sized from the device', minimum=0, resumable=True),
    Key('train.deterministic_ops', True, "GPU: XLA's deterministic scatter-adds "
        '(False: faster)', resumable=True),
    Key('train.log_every', 100, 'steps between loss fetches (progress, TensorBoard)',
        resumable=True),
    Key('train.checkpoint_every_steps', 0, 'also save the latest checkpoint inside an '
        'epoch every N micro-steps (0: only at epoch ends)', minimum=0, resumable=True),
    Key('train.checkpoint_every_minutes', 30.0, 'also save inside an epoch when the '
        'newest checkpoint is this old (0: never)', minimum=0, resumable=True),
    # -- eval
    Key('eval.protocol', 'sampled', "'sampled' (1 + num_negatives candidates) or 'full' "
        '(catalogue)', choices=('sampled', 'full')),
    Key('eval.other_protocol', False, 'also compute the other protocol (reported as '
        'val_full/...)'),
    Key('eval.monitor', 'val/NDCG@10', 'early-stopping metric (mode max)'),
    Key('eval.negatives', 'random', "'random' (reference, uniform) or 'popularity'",
        choices=('random', 'popularity')),
    Key('eval.num_negatives', 99, 'sampled candidates besides the target', minimum=1),
    Key('eval.batch_size', 256, 'evaluation users per step', minimum=1, resumable=True),
    Key('eval.ks', (1, 5, 10, 20, 50), 'cut-offs of Recall@K and NDCG@K'),
    Key('eval.full_chunk', 16384, 'items per chunk in full-catalogue ranking', minimum=1),
    # -- mesh and hosts (how, not what, is computed: all resumable)
    Key('mesh.data', -1, 'devices on the batch axis (-1: all devices / model)',
        resumable=True),
    Key('mesh.model', 1, 'devices sharing the item table (with shard_items)', resumable=True),
    Key('mesh.shard_items', False, "shard the item embedding / item head over 'model'",
        resumable=True),
    Key('distributed.coordinator', '', "host:port; '' = single process or from the env",
        resumable=True),
    Key('distributed.num_processes', 0, 'processes of a multi-host run (0: from the env)',
        resumable=True),
    Key('distributed.process_id', -1, "this process's index (-1: from the env)",
        resumable=True),
    Key('distributed.init_timeout_s', 300.0, 'seconds to wait for every process to join',
        minimum=1, resumable=True),
    Key('distributed.heartbeat_timeout_s', 10.0, 'a process silent this long is lost: '
        'the others exit 75 (also catches a frozen one)', minimum=1, resumable=True),
    Key('distributed.shutdown_timeout_s', 120.0, 'how far apart the processes may finish '
        'a run (longer than process 0 writing its summary and report)', minimum=1,
        resumable=True),
    # -- hyper-parameter search (gear_jax.tune; a trial's own training ignores these)
    Key('tune.space', TUNE_SPACES['gear'], "'key: choice(a, b, ...)', 'key: uniform(lo, "
        "hi)', 'key: loguniform(lo, hi)' or 'key: int(lo, hi[, step])' entries; SASRec's "
        'default has no train.alpha', resumable=True),
    Key('tune.startup_trials', 5, 'trials sampled at random before TPE models the '
        'results, and finished before the median pruner prunes', minimum=0,
        resumable=True),
    Key('tune.warmup_epochs', 2, 'epochs every trial runs before it may be pruned',
        minimum=0, resumable=True),
)
TABLE: dict[str, Key] = {k.name: k for k in KEYS}


def choices(name: str) -> tuple:
  """The allowed values of key `name`."""
  return TABLE[name].allowed()


def resumable(name: str) -> bool:
  """Whether a resumed run may change key `name` (unknown keys may not)."""
  return name in TABLE and TABLE[name].resumable


def get_default_config(model: str = 'gear') -> ml_collections.ConfigDict:
  """Every key at its default, with model `model`'s own model settings (the registry's)."""
  root: dict = {}
  for key in KEYS:
    *path, leaf = key.name.split('.')
    node = root
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = key.default
  config = ml_collections.ConfigDict(root)
  use_model(config, model)
  return config


def use_model(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets ``model.name`` and the model's own settings (e.g. SASRec's single head)."""
  from gear_jax.models import registry
  if name not in registry.names():
    raise ConfigError(f'{name!r} is not a registered model; use one of '
                      f'{registry.names()}', field='config.model.name')
  config.model.name = name
  for k, v in registry.model_defaults(name).items():
    config.model[k] = v
  config.tune.space = TUNE_SPACES.get(name, TUNE_SPACES['sasrec'])


# -- flat views ---------------------------------------------------------------------------

def flat_config(config) -> dict:
  """{'model.d_model': 32, ...} of a ConfigDict or a plain nested dict, in JSON's terms
  (tuples as lists): what config.json holds, flattened."""
  out = {}
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  walk(config if isinstance(config, dict) else config.to_dict(), '')
  return out


def config_from_dict(saved: Mapping) -> ml_collections.ConfigDict:
  """The ConfigDict of a saved config (config.json's nested dict): the defaults, then
  every saved value (lists back to tuples). Keys missing from an older file keep their
  defaults."""
  config = get_default_config()
  flat = {k: tuple(v) if isinstance(v, list) else v for k, v in flat_config(dict(saved)).items()}
  config.update_from_flattened_dict(flat)
  return config


# -- loading ------------------------------------------------------------------------------

def load_config(spec: str, overrides: Mapping[str, Any] | Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """The config of file `spec` ('configs/demo.py' or a variant 'configs/demo.py:sasrec')
  with `overrides` ({'model.d_model': 16} or ['model.d_model=16']), parsed exactly as
  the command lines parse ``--config`` and ``--config.*`` (the same flag machinery,
  types and errors); a bad key or value is a `ConfigError`. As on the command line, a
  ``data.path`` override turns synthetic generation off unless it is overridden too."""
  from absl import flags
  from ml_collections import config_flags
  if isinstance(overrides, Mapping):
    overrides = [f'{k}={_flag_text(v)}' for k, v in overrides.items()]
  argv = ['load_config', f'--config={spec}'] + [f'--config.{o}' for o in overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  parse_flags(values, argv)
  return synthetic_on_purpose(values['config'])


def _flag_text(v) -> str:
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(_flag_text(x) for x in v) + (',)' if len(v) == 1 else ')')
  return str(v)


def synthetic_on_purpose(flag) -> ml_collections.ConfigDict | None:
  """The ConfigDict of a `config_flags` flag (None if not given), with synthetic data
  generated only on purpose: a ``data.path`` set on the command line must exist
  unless ``--config.data.synthetic.enabled=True`` is given too (a mistyped path is a
  clean "file not found", never a silently generated data set)."""
  from ml_collections import config_flags
  config = flag.value
  if config is None:
    return None
  given = config_flags.get_override_values(flag)
  if 'data.path' in given and 'data.synthetic.enabled' not in given:
    with config.unlocked():
      config.data.synthetic.enabled = False
  return config


def parse_flags(values, argv: list[str], name: str = 'config') -> list[str]:
  """``values(argv)`` (absl FlagValues), with every error about a flag as one
  `ConfigError` (see `flag_errors`); a config file that cannot be loaded names the
  file and the cause."""
  with flag_errors(argv):
    rest = values(argv)
  if name in values and values[name].value is not None:
    try:
      values[name].value.get('seed')  # a file that failed to load raises here
    except OSError as e:
      lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
      raise ConfigError(f'--{name}: cannot load the config file ({lines[-1]})') from None
  return rest


@contextlib.contextmanager
def flag_errors(argv: list[str]):
  """Turns the flag errors raised inside into one-line `ConfigError`s: an unknown
  ``--config.*`` key names the key and ml_collections' suggestion ("did you mean
  model.d_model?"), a value of the wrong type names the flag and the value. (Defining
  a `config_flags` dict flag already parses the overrides, so the definitions run
  inside too.)"""
  from absl import flags
  try:
    yield
  except flags.Error as e:
    raise ConfigError(_flag_message(str(e))) from None
  except (AttributeError, KeyError) as e:
    message = _unknown_key(e, argv)
    if message is None:
      raise
    raise ConfigError(message) from None


def _flag_message(text: str) -> str:
  """absl's 'flag --x=v: reason' as one line (a traceback cut to its last line)."""
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  first = lines[0][len('flag '):] if lines[0].startswith('flag ') else lines[0]
  if len(lines) > 1 and any(ln.startswith('Traceback') for ln in lines):
    cause = lines[-1].split(': ', 1)[-1] if 'Error: ' in lines[-1] else lines[-1]
    first = f'{first.rstrip(":")} {cause}'
  return first


def _unknown_key(exc: Exception, argv: list[str]) -> str | None:
  """'--config.model.d_modle=16: no key model.d_modle; did you mean model.d_model?'"""
  text = str(exc.args[0] if exc.args else exc).strip('\'"')
  text = text.replace('\\n', '\n').replace("\\'", "'")
  bad = text.split('\n')[0].strip('\'" ')
  hint = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=')[0].split('.')
    if bad in path:
      i = path.index(bad)
      where = '.'.join(path[:i + 1])
      msg = f'{arg}: no config key {where}'
      suggestion = hint.group(1) if hint else _closest(path[:i], bad)
      if suggestion:
        msg += f'; did you mean {".".join(path[:i] + [suggestion] + path[i + 1:])}?'
      return msg
  return None  # not about a --config.* flag: a bug, keep its traceback


def _closest(prefix: list[str], name: str) -> str | None:
  known = {k.name.split('.')[len(prefix)] for k in KEYS
           if k.name.split('.')[:len(prefix)] == prefix and len(k.name.split('.')) > len(prefix)}
  match = difflib.get_close_matches(name, sorted(known), n=1)
  return match[0] if match else None


# -- validation ---------------------------------------------------------------------------

def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def validate_config(config) -> None:
  """Fails early, before any data is read or anything is compiled: every key against
  its row of the table, then the rules that relate keys."""
  for key in KEYS:
    value = _get(config, key.name)
    allowed = key.allowed()
    if allowed is not None and value not in allowed:
      raise ConfigError(f'{value!r} is not one of {allowed}', field=f'config.{key.name}')
    if key.minimum is not None and float(value) < key.minimum:
      raise ConfigError(f'must be >= {key.minimum:g}, got {value}',
                        field=f'config.{key.name}')
  if config.model.d_model % config.model.n_head:
    raise ConfigError(f'd_model {config.model.d_model} is not divisible by n_head '
                      f'{config.model.n_head}', field='config.model.d_model')
  if not 0.0 <= config.model.dropout < 1.0:
    raise ConfigError('dropout must be in [0, 1)', field='config.model.dropout')
  preset = config.data.synthetic.get('preset', '')
  if preset:
    from gear_jax.data import synthetic
    synthetic.preset_knobs(preset)  # ConfigError naming config.data.synthetic.preset
  _validate_monitor(config)


def _validate_monitor(config) -> None:
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


def markdown_table() -> str:
  """The table of docs/configs.md: key, default, allowed values, resumable, meaning."""
  def cell(v):
    return f'`{v!r}`'.replace('|', '\\|')
  lines = ['| key | default | allowed | resume may change | meaning |',
           '|---|---|---|---|---|']
  for k in KEYS:
    allowed = k.allowed()
    if allowed is not None:
      what = ', '.join(f'`{a}`' for a in allowed)
    elif k.minimum is not None:
      what = f'>= {k.minimum:g}'
    else:
      what = ''
    lines.append(f'| `{k.name}` | {cell(k.default)} | {what} | '
                 f'{"yes" if k.resumable else ""} | {k.doc.replace("|", "/")} |')
  return '\n'.join(lines) + '\n'
