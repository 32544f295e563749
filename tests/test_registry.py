"""The model registry and the package's structure.

- A throw-away model defined here, registered at run time, trains, evaluates and
  recommends through the same code as the built-in ones (`gear_jax.models.interface`
  is all the trainer, evaluator and recommend step rely on).
- The import graph of gear_jax: no cycle among module-level imports, the model
  modules layered (shared blocks, then models, then the registry), every imported
  gear_jax module exists.
- ``model.name`` is checked against the registry.
"""

from __future__ import annotations

import ast
import json
import pathlib
from typing import Any

import pytest

from conftest import REPO, TEST_CONFIG
from gear_jax import defaults
from gear_jax.errors import ConfigError
from gear_jax.models import registry
from gear_jax.models.interface import ModelSpec


# -- a throw-away model ------------------------------------------------------------------

def _tiny_module():
  """A Linen class implementing `SequenceModel`: the item and the behavior of every
  interaction, embedded, summed and mixed by one dense layer; the state at t scores
  the item at t + 1 (tied item head)."""
  import flax.linen as nn
  import jax.numpy as jnp
  from gear_jax.models import layers

  class Tiny(nn.Module):
    num_items: int
    num_behaviors: int
    d_model: int = 8
    n_head: int = 1
    n_layer: int = 1
    dropout: float = 0.0
    mask_padding: bool = False
    dtype: Any = jnp.float32
    precision: Any = None
    table_rows: int = 0
    kernels: str = 'xla'

    def setup(self):
      self.item_emb = layers.item_table(self.num_items, self.d_model, self.dtype,
                                        self.table_rows)
      self.behavior_emb = nn.Embed(self.num_behaviors + 1, self.d_model, dtype=self.dtype)
      self.mix = nn.Dense(self.d_model, dtype=self.dtype, precision=self.precision)
      self.drop = layers.Dropout(self.dropout)

    def __call__(self, items, behaviors, gaps, *, deterministic: bool = True):
      """[B, L] -> [B, L-1, d]: the state after each of the first L - 1 interactions."""
      del gaps
      x = self.item_emb(items[:, :-1]) + self.behavior_emb(behaviors[:, :-1])
      return jnp.tanh(self.mix(self.drop(x, deterministic)))

    def last_state(self, items, behaviors, gaps):
      return self(items, behaviors, gaps, deterministic=True)[:, -1]

  return Tiny


def tiny_loss(params, batch, dropout_key, *, model, alpha, loss_impl, loss_memory_mb,
              vocab_shards):
  """Next-item cross-entropy at every position whose token and label are real."""
  import jax.numpy as jnp
  from gear_jax import losses
  del alpha
  items = batch['items']
  rngs = None if dropout_key is None else {'dropout': dropout_key}
  h = model.apply({'params': params}, items, batch['behaviors'], batch['gaps'],
                  deterministic=dropout_key is None, rngs=rngs)
  labels = items[:, 1:]
  loss, count = losses.item_cross_entropy(
      params, h, labels, (labels != 0) & (items[:, :-1] != 0), model=model,
      loss_impl=loss_impl, loss_memory_mb=loss_memory_mb, vocab_shards=vocab_shards)
  return loss, {'loss': loss, 'item_loss': loss, 'behavior_loss': jnp.zeros(()),
                'positions': count}


@pytest.fixture
def tiny():
  """Model 'tiny' registered for the test (n_head 1 and mask_padding its own values)."""
  spec = ModelSpec(name='tiny', module=_tiny_module(), loss=tiny_loss,
                   defaults={'n_head': 1, 'mask_padding': True})
  registry.register(spec)
  try:
    yield spec
  finally:
    registry.unregister('tiny')
  assert 'tiny' not in registry.names()


def test_registered_model_trains_evaluates_and_recommends(tiny, tmp_path):
  import jax
  import numpy as np
  from gear_jax import checkpoint as ckpt_lib
  from gear_jax import evaluator, parallel, rundir, run_log, steps, trainer
  from gear_jax.data import load_dataset, pipeline
  assert registry.names()[:2] == ('gear', 'sasrec') and 'tiny' in registry.names()
  assert defaults.choices('model.name') == registry.names()
  # the variant of a config file for the model: the model's own values, the file's rest
  variant = defaults.load_config(f'{TEST_CONFIG}:tiny')
  assert variant.model.name == 'tiny'
  assert variant.model.n_head == 1 and variant.model.mask_padding is True
  assert variant.model.d_model == 8  # configs/test.py's
  config = defaults.load_config(f'{TEST_CONFIG}:tiny', {
      'data.path': str(tmp_path / 'syn.txt'), 'data.synthetic.enabled': True,
      'data.cache_dir': str(tmp_path / 'cache'), 'train.num_epochs': 2})
  workdir = tmp_path / 'run'
  summary = trainer.train_and_evaluate(config, str(workdir))
  records = run_log.read_metrics(str(workdir))
  assert [r['epoch'] for r in records] == [0, 1]
  assert all(np.isfinite(r['train/loss']) for r in records)
  assert summary['epochs_run'] == 2 and 'val/NDCG@10' in summary['best_val']
  assert json.loads((workdir / 'summary.json').read_text())['best_val'] == \
      json.loads(json.dumps(summary['best_val']))
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['name'] == 'tiny'
  store = ckpt_lib.CheckpointStore(str(workdir), read_only=True)
  assert store.latest_step() == records[-1]['step'] and store.best_step() is not None
  store.close()
  # the best checkpoint, restored through the registry, reproduces the summary
  out = evaluator.evaluate_run(rundir.read_config(str(workdir)), str(workdir),
                               checkpoint='best')
  assert out['metrics'] == summary['best_val']
  data, _ = load_dataset(config.data)
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.model))
  trained = rundir.load_trained(rundir.read_config(str(workdir)), str(workdir), data,
                                mesh, 'latest')
  assert type(trained.model) is tiny.module and registry.spec_of(trained.model) is tiny
  assert trained.model.n_head == 1 and trained.model.mask_padding
  assert trained.step == records[-1]['step']
  batch = pipeline.EvalBatches(data, 'val', 16, int(config.data.max_len))(0)
  batch['exclude'] = np.asarray(batch['items'][:, :-1])
  scores, ids = jax.jit(lambda p, b: steps.recommend_step(p, b, model=trained.model,
                                                          k=5))(trained.params, batch)
  scores, ids = np.asarray(scores), np.asarray(ids)
  assert ids.shape == scores.shape == (16, 5)
  assert ((ids >= 1) & (ids <= data.num_items)).all()
  assert (np.diff(scores, axis=1) <= 0).all()  # best first
  for row, seen in zip(ids, batch['exclude']):
    assert not set(row) & (set(seen) - {0})


def test_model_name_must_be_registered(tiny):
  config = defaults.get_default_config()
  config.model.name = 'bert4rec'
  with pytest.raises(ConfigError, match='config.model.name') as e:
    defaults.validate_config(config)
  assert e.value.field == 'config.model.name' and "'tiny'" in str(e.value)
  with pytest.raises(ConfigError, match='config.model.name'):
    defaults.get_default_config('bert4rec')
  with pytest.raises(ValueError, match='bert4rec'):
    registry.get('bert4rec')
  config.model.name = 'tiny'
  defaults.validate_config(config)  # registered: accepted
  registry.unregister('tiny')
  with pytest.raises(ConfigError, match='config.model.name'):
    defaults.validate_config(config)
  assert registry.names() == ('gear', 'sasrec') == tuple(registry.BUILTIN)


def test_builtin_specs():
  from gear_jax.models import gear, sasrec
  assert registry.get('gear').module is gear.GEAR
  assert registry.get('gear').loss is gear.gear_loss
  assert registry.get('sasrec').loss is sasrec.sasrec_loss
  assert dict(registry.model_defaults('sasrec')) == {'n_head': 1, 'n_layer': 2,
                                                     'mask_padding': True}
  assert dict(registry.model_defaults('gear')) == {}
  with pytest.raises(ValueError, match='not a registered model'):
    registry.spec_of(object())


# -- the import graph --------------------------------------------------------------------

PACKAGE = REPO / 'gear_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _is_package(name: str) -> bool:
  return (REPO / pathlib.Path(*name.split('.')) / '__init__.py').is_file()


def _exists(name: str) -> bool:
  return _is_package(name) or (REPO / pathlib.Path(*name.split('.'))).with_suffix(
      '.py').is_file()


def _type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
      isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _imports(path: pathlib.Path) -> list[tuple[str, str, int, str | None]]:
  """(imported gear_jax module, 'module' | 'function', line, attribute) for every
  import of a gear_jax module in `path`: ``from gear_jax import x`` is gear_jax.x when
  x is a module, else an attribute of gear_jax; relative imports are resolved."""
  name = _module_name(path)
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  out = []

  def visit(node, level: str):
    for child in ast.iter_child_nodes(node):
      inner = level
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        inner = 'function'
      if isinstance(child, ast.If) and _type_checking(child):
        continue  # not executed
      if isinstance(child, ast.Import):
        for alias in child.names:
          if alias.name.split('.')[0] == 'gear_jax':
            out.append((alias.name, inner, child.lineno, None))
      elif isinstance(child, ast.ImportFrom):
        if child.level:
          base = package.split('.')
          base = base[:len(base) - (child.level - 1)]
          source = '.'.join(base + ([child.module] if child.module else []))
        else:
          source = child.module or ''
        if source.split('.')[0] != 'gear_jax':
          continue
        for alias in child.names:
          sub = f'{source}.{alias.name}'
          if _exists(sub):
            out.append((sub, inner, child.lineno, None))
          else:
            out.append((source, inner, child.lineno, alias.name))
      visit(child, inner)

  visit(ast.parse(path.read_text(), str(path)), 'module')
  return out


def _graph(level: str | None = None) -> dict[str, set[str]]:
  graph = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    graph[_module_name(path)] = {m for m, where, _, _ in _imports(path)
                                 if level is None or where == level}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` (its modules, the first one repeated at the end), or None."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def dfs(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = dfs(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = dfs(node)
      if found:
        return found
  return None


def test_cycle_finder_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_module_level_imports_have_no_cycle():
  graph = _graph('module')
  assert len(graph) > 30 and 'gear_jax.models.registry' in graph
  cycle = _cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_every_imported_gear_jax_module_exists():
  """Module- and function-level imports alike (a function-level import of a module
  that moved fails only when that function runs), in the package, scripts and tests;
  ``from gear_jax.x import name`` must find `name` in gear_jax/x."""
  missing = []
  files = [*PACKAGE.rglob('*.py'), *(REPO / 'scripts').glob('*.py'),
           *(REPO / 'tests').glob('*.py')]
  for path in sorted(files):
    for module, _, line, attribute in _imports(path):
      where = f'{path.relative_to(REPO)}:{line}'
      if not _exists(module):
        missing.append(f'{where}: {module}')
      elif attribute is not None and attribute != '*':
        target = (REPO / pathlib.Path(*module.split('.')))
        target = target / '__init__.py' if _is_package(module) else target.with_suffix('.py')
        if attribute not in _top_level_names(target):
          missing.append(f'{where}: {module}.{attribute}')
  assert not missing, missing


def _top_level_names(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for t in targets:
        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split('.')[0] for a in node.names)
  if '__getattr__' in names and '__all__' in names:  # lazy attributes (gear_jax)
    module = ast.parse(path.read_text())
    for node in module.body:
      if isinstance(node, ast.Assign) and any(
          isinstance(t, ast.Name) and t.id == '__all__' for t in node.targets):
        names.update(ast.literal_eval(node.value))
  return names


def _models_imported(module: str) -> set[str]:
  """The gear_jax.models modules `module` imports, at any level."""
  return {m for m in _graph()[module] if m.startswith('gear_jax.models.')}


def test_models_are_layered():
  init = PACKAGE / 'models' / '__init__.py'
  statements = [n for n in ast.walk(ast.parse(init.read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))]
  assert statements == [], 'gear_jax/models/__init__.py imports something'
  shared = {'gear_jax.models.layers', 'gear_jax.models.kernels'}
  for module in sorted(shared):
    assert _models_imported(module) <= shared - {module}, module
  assert _models_imported('gear_jax.models.kernels') == set()
  for model in ('gear_jax.models.gear', 'gear_jax.models.sasrec'):
    got = _models_imported(model)
    assert got <= shared | {'gear_jax.models.interface'}, (model, got)
    assert 'gear_jax.models.layers' in got and 'gear_jax.models.interface' in got
  # the interface imports no JAX and no model: reading the registry stays cheap
  interface = PACKAGE / 'models' / 'interface.py'
  assert not {m for m, *_ in _imports(interface)}
  tops = {a.name.split('.')[0] for n in ast.walk(ast.parse(interface.read_text()))
          if isinstance(n, ast.Import) for a in n.names} | {
              (n.module or '').split('.')[0] for n in ast.walk(ast.parse(
                  interface.read_text())) if isinstance(n, ast.ImportFrom)}
  assert not tops & {'jax', 'flax', 'numpy'}, tops
  # the registry imports its models lazily (by name, through importlib)
  registry_path = PACKAGE / 'models' / 'registry.py'
  module_level = {m for m, where, *_ in _imports(registry_path) if where == 'module'}
  assert module_level <= {'gear_jax.models.interface'}, module_level
