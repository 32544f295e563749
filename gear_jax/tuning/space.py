"""The search space of a study: ``config.tune.space`` parsed and checked.

An entry is ``'<config key>: <distribution>'`` with one of
  choice(a, b, ...)      one of the values (numbers, strings, True/False)
  uniform(lo, hi)        a float in [lo, hi]
  loguniform(lo, hi)     a float in [lo, hi], uniform in log space (lo > 0)
  int(lo, hi[, step])    an integer lo, lo + step, ..., <= hi
Every entry is checked before a study is touched: the key must be a config key that a
trial may set (not ``seed``, which a trial derives from its number, nor ``tune.*``),
the values must have the key's type, and the smallest and largest value of each
dimension must pass `gear_jax.defaults.validate_config` in the base config. A bad
entry is a `ConfigError` naming it.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

from gear_jax import defaults
from gear_jax.errors import ConfigError

KINDS = ('choice', 'uniform', 'loguniform', 'int')
_ENTRY = re.compile(r'^\s*([A-Za-z_][\w.]*)\s*:\s*([a-z]+)\s*\((.*)\)\s*$')
FIELD = 'config.tune.space'


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched key: its distribution `kind` and `args` (choices, or lo, hi[, step])."""
  key: str
  kind: str
  args: tuple
  text: str  # the entry as written

  def suggest(self, trial) -> Any:
    """The value an Optuna trial proposes for this key."""
    if self.kind == 'choice':
      return trial.suggest_categorical(self.key, list(self.args))
    if self.kind == 'int':
      lo, hi, *step = self.args
      return trial.suggest_int(self.key, lo, hi, step=step[0] if step else 1)
    return trial.suggest_float(self.key, self.args[0], self.args[1],
                               log=self.kind == 'loguniform')

  def grid(self) -> list | None:
    """Every value, for the grid sampler (None for a continuous range)."""
    if self.kind == 'choice':
      return list(self.args)
    if self.kind == 'int':
      lo, hi, *step = self.args
      return list(range(lo, hi + 1, step[0] if step else 1))
    return None

  def extremes(self) -> list:
    return list(self.args) if self.kind == 'choice' else [self.args[0], self.args[1]]


def _error(entry: str, message: str, hint: str | None = None) -> ConfigError:
  return ConfigError(f'{entry!r}: {message}', field=FIELD, hint=hint or
                     "entries look like 'train.lr: loguniform(1e-4, 3e-3)' "
                     '(docs/tuning.md)')


def _parse_entry(entry: str) -> tuple[str, str, tuple]:
  match = _ENTRY.match(entry) if isinstance(entry, str) else None
  if not match:
    raise _error(entry, "not of the form 'key: distribution(arguments)'")
  key, kind, text = match.groups()
  if kind not in KINDS:
    raise _error(entry, f'unknown distribution {kind!r}; use one of {KINDS}')
  try:
    args = ast.literal_eval(f'({text},)') if text.strip() else ()
  except (ValueError, SyntaxError):
    raise _error(entry, f'its arguments ({text}) are not literals') from None
  return key, kind, args


def _check_types(entry: str, kind: str, args: tuple, default: Any) -> tuple:
  """`args` converted to the key's type (an int key takes int(...) or int choices)."""
  if isinstance(default, (list, tuple)):
    raise _error(entry, 'a tuple-valued key cannot be searched')
  if kind == 'choice':
    if not args:
      raise _error(entry, 'choice() needs at least one value')
    if len(set(map(repr, args))) != len(args):
      raise _error(entry, 'a value is given twice')
    want = type(default)
    ok = (lambda v: type(v) is bool) if want is bool else (
        (lambda v: type(v) is int) if want is int else
        (lambda v: type(v) in (int, float)) if want is float else
        (lambda v: isinstance(v, str)))
    bad = [v for v in args if not ok(v)]
    if bad:
      raise _error(entry, f'{bad[0]!r} is not a {want.__name__}, the type of this key')
    return tuple(float(v) for v in args) if want is float else args
  numeric = all(type(v) in (int, float) for v in args)
  if kind == 'int':
    if not (2 <= len(args) <= 3 and all(type(v) is int for v in args)):
      raise _error(entry, 'int() takes two or three integers: lo, hi[, step]')
    if type(default) not in (int, float) or type(default) is bool:
      raise _error(entry, f'the key holds a {type(default).__name__}; use choice(...)')
    if len(args) == 3 and args[2] < 1:
      raise _error(entry, 'the step must be >= 1')
  else:
    if len(args) != 2 or not numeric:
      raise _error(entry, f'{kind}() takes two numbers: lo, hi')
    if type(default) is not float:
      raise _error(entry, f'the key holds a {type(default).__name__}; '
                   + ('use int(lo, hi)' if type(default) is int else 'use choice(...)'))
    if kind == 'loguniform' and args[0] <= 0:
      raise _error(entry, 'loguniform needs lo > 0')
    args = (float(args[0]), float(args[1]))
  if args[0] >= args[1]:
    raise _error(entry, f'the range is empty (lo {args[0]} >= hi {args[1]})')
  return args


def parse_space(entries: Sequence[str], base) -> list[Dimension]:
  """The dimensions of `entries`, checked against the base ConfigDict `base`."""
  if isinstance(entries, str) or not entries:
    raise ConfigError('the search space is empty' if not entries else
                      'must be a tuple of entries, not one string', field=FIELD,
                      hint="e.g. --config.tune.space=\"('train.lr: loguniform(1e-4, "
                      "3e-3)',)\"")
  flat = defaults.flat_config(base)
  dims: list[Dimension] = []
  for entry in entries:
    key, kind, args = _parse_entry(entry)
    if key not in flat or key not in defaults.TABLE:
      close = next(iter(difflib.get_close_matches(key, list(defaults.TABLE), 1)), None)
      raise _error(entry, f'no config key {key}' + (f'; did you mean {close}?' if close
                                                     else ''))
    if key == 'seed' or key.startswith('tune.'):
      raise _error(entry, f'{key} cannot be searched (a trial derives its seed from '
                   'config.seed and its number)' if key == 'seed' else
                   f'{key} configures the search itself')
    if any(d.key == key for d in dims):
      raise _error(entry, f'{key} is searched twice')
    dims.append(Dimension(key, kind, _check_types(entry, kind, args, flat[key]),
                          entry.strip()))
  for dim in dims:
    for value in dim.extremes():
      try:
        defaults.validate_config(with_values(base, {dim.key: value}))
      except ConfigError as e:
        raise _error(dim.text, f'{value!r} is not a valid {dim.key}: {e.message}',
                     hint='narrow the range') from None
  return dims


def with_values(base, values: dict[str, Any], seed: int | None = None):
  """A copy of ConfigDict `base` with `values` ({'model.d_model': 64}) and `seed` set."""
  config = copy.deepcopy(base)
  config.update_from_flattened_dict(dict(values))  # an int into a float key becomes a float
  if seed is not None:
    config.seed = int(seed)
  return config


def grid_space(dims: list[Dimension]) -> dict[str, list]:
  """The grid sampler's search space; every dimension must be discrete."""
  continuous = [d.text for d in dims if d.grid() is None]
  if continuous:
    raise ConfigError(f'--sampler grid needs discrete dimensions; {continuous[0]!r} is '
                      'continuous', field=FIELD,
                      hint='use choice(...) or int(lo, hi, step), or --sampler tpe')
  return {d.key: d.grid() for d in dims}
