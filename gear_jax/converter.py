"""Reading a reference (PyTorch) GEAR model into an orbax checkpoint: the library
behind ``python -m gear_jax.convert`` (see that module for the file formats).

With ``do_verify`` and ``input/*`` + ``output/*`` arrays in the file, the converted
model is run on those inputs and the maximum absolute errors of the item and behavior
logits, candidate scores, loss and gradients are reported; `TOLERANCE` is the bar.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gear_jax import checkpoint as ckpt_lib
from gear_jax import retrieval, run_log
from gear_jax.models import gear, layers, registry
from gear_jax.data import DataError
from gear_jax.errors import CheckpointError
from gear_jax.lock import WorkdirLock

TOLERANCE = 1e-4
_PREFIXES = ('param/', 'state_dict/', 'state_dict.', 'backbone.', 'model.')
_BLOCKS = ('item_attention_blocks', 'behavior_attention_blocks', 'upper_transformer')
_EXPORT_HINT = (
    "python -c \"import torch, numpy as np; sd = torch.load('MODEL.ckpt', "
    "map_location='cpu', weights_only=False)['state_dict']; np.savez('MODEL.npz', "
    "**{k: v.numpy() for k, v in sd.items()})\"")


def _strip(name: str) -> str:
  changed = True
  while changed:
    changed = False
    for p in _PREFIXES:
      if name.startswith(p):
        name, changed = name[len(p):], True
  return name


def flax_path(torch_name: str, ndim: int) -> tuple[tuple[str, ...], bool]:
  """PyTorch parameter name -> (path in the Flax params tree, transpose?)."""
  name = _strip(torch_name)
  m = re.fullmatch(r'(\w+)\.(\d+)\.(.+)', name)
  if m and m.group(1) in _BLOCKS:
    prefix, rest = (f'{m.group(1)}_{m.group(2)}',), m.group(3)
  else:
    prefix, rest = (), name
  table = {
      'item_emb.weight': (('item_emb', 'embedding'), False),
      'behavior_emb.weight': (('behavior_emb', 'embedding'), False),
      'LayerNorm.weight': (('LayerNorm', 'scale'), False),
      'LayerNorm.bias': (('LayerNorm', 'bias'), False),
      'self_attn.in_proj_weight': (('self_attn', 'in_proj', 'kernel'), True),
      'self_attn.in_proj_bias': (('self_attn', 'in_proj', 'bias'), False),
  }
  if rest in table and (prefix or not rest.startswith('self_attn')):
    path, transpose = table[rest]
    return prefix + path, transpose
  m = re.fullmatch(r'(self_attn\.out_proj|linear1|linear2|norm1|norm2)\.(weight|bias)', rest)
  if prefix and m:
    module = tuple(m.group(1).split('.'))
    if m.group(2) == 'bias':
      return prefix + module + ('bias',), False
    if ndim == 2:
      return prefix + module + ('kernel',), True
    return prefix + module + ('scale',), False
  raise KeyError(torch_name)


def torch_to_params(state: dict[str, np.ndarray]) -> dict:
  """A PyTorch GEAR state_dict (numpy arrays) -> the Flax params pytree (float32)."""
  params: dict = {}
  unknown = []
  for name, value in state.items():
    value = np.asarray(value, np.float32)
    try:
      path, transpose = flax_path(name, value.ndim)
    except KeyError:
      unknown.append(name)
      continue
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(value.T if transpose else value)
  if unknown:
    raise DataError(f'unrecognised GEAR parameters: {unknown[:8]}'
                    + (' ...' if len(unknown) > 8 else ''), field='--input',
                    hint='pass the state_dict of a reference GEAR model')
  for required in ('item_emb', 'behavior_emb', 'LayerNorm', 'item_attention_blocks_0',
                   'behavior_attention_blocks_0'):
    if required not in params:
      raise DataError(f'the state_dict has no {required} parameters', field='--input',
                      hint='pass the state_dict of a reference GEAR model')
  return params


def read_reference(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz, or the state_dict of a Lightning .ckpt (needs torch)."""
  if not os.path.exists(path):
    raise DataError('file not found', path=path, field='--input')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError('reading a .ckpt needs torch, which is not installed', path=path,
                    field='--input', hint='export the state_dict to .npz where torch '
                    'is available: ' + _EXPORT_HINT) from None
  ckpt = torch.load(path, map_location='cpu', weights_only=False)
  state = ckpt.get('state_dict', ckpt)
  out = {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, 'numpy')}
  if 'hyper_parameters' in ckpt:
    out['config_json'] = np.array(json.dumps(
        {k: v for k, v in ckpt['hyper_parameters'].items()
         if isinstance(v, (int, float, str, bool))}))
  return out


def split_arrays(arrays: dict[str, np.ndarray]):
  """(state_dict, inputs, outputs, grads, file config) from a reference file."""
  groups = {g: {} for g in ('input', 'output', 'grad', 'adam_step')}
  state = {}
  file_config = json.loads(str(arrays['config_json'])) if 'config_json' in arrays else {}
  for k, v in arrays.items():
    head, _, tail = k.partition('/')
    if head in groups and tail:
      groups[head][tail] = v
    elif k != 'config_json':
      state[k] = v
  return state, groups['input'], groups['output'], groups['grad'], file_config


def model_config(params: dict, file_config: dict, config) -> ml_collections.ConfigDict:
  """The run config with model sizes taken from the weights and the file's config."""
  config = ml_collections.ConfigDict(config.to_dict())
  emb = params['item_emb']['embedding']
  config.model.d_model = int(emb.shape[1])
  config.model.n_layer = sum(1 for k in params if k.startswith('upper_transformer_'))
  for key, target in (('n_head', 'model.n_head'), ('max_len', 'data.max_len'),
                      ('alpha', 'train.alpha'), ('dropout', 'model.dropout')):
    if key in file_config:
      section, field = target.split('.')
      config[section][field] = type(config[section][field])(file_config[key])
  config.model.precision = 'float32'
  return config


def verify(params: dict, config, inputs: dict, outputs: dict, grads: dict) -> dict:
  """Runs the converted model on the reference inputs; returns the error report."""
  num_items = params['item_emb']['embedding'].shape[0] - 1
  num_behaviors = params['behavior_emb']['embedding'].shape[0] - 1
  model = registry.build(num_items, num_behaviors, config.model, 'float32')
  batch = {'items': jnp.asarray(inputs['items'], jnp.int32),
           'behaviors': jnp.asarray(inputs['behaviors'], jnp.int32),
           'gaps': jnp.asarray(np.rint(inputs['time_gaps']), jnp.int32)}
  hp = jax.lax.Precision.HIGHEST

  def loss_fn(p):
    return gear.gear_loss(p, batch, None, model=model, alpha=float(config.train.alpha),
                           loss_impl='dense')

  (loss, _), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  h_beh, h_item = model.apply({'params': params}, batch['items'], batch['behaviors'],
                              batch['gaps'], deterministic=True)
  got = {'logits_item': retrieval.item_logits(params, h_beh, hp),
         'logits_behavior': gear.behavior_logits(params, h_item, hp),
         'loss': loss}
  if 'candidates' in inputs:
    got['scores'] = retrieval.score_candidates(
        params, h_beh[:, -1], jnp.asarray(inputs['candidates'], jnp.int32), hp)
  errors = {k: float(np.max(np.abs(np.asarray(got[k]) - outputs[k])))
            for k in got if k in outputs}
  if grads:
    ref = torch_to_params(grads)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g, ref)
    errors['grad'] = max(jax.tree_util.tree_leaves(diffs))
  return {'max_abs_error': errors,
          'ok': bool(errors) and all(v <= TOLERANCE for v in errors.values())}


def convert(input_path: str, output_dir: str, config, *, do_verify: bool = False
            ) -> dict:
  """Converts `input_path` into an orbax checkpoint in `output_dir`; returns a report."""
  state, inputs, outputs, grads, file_config = split_arrays(read_reference(input_path))
  params = torch_to_params(state)
  config = model_config(params, file_config, config)
  if do_verify and (not inputs or not outputs):
    raise DataError('holds no input/* and output/* arrays to verify',
                    path=input_path, field='--input', hint='drop --verify')
  with WorkdirLock(output_dir, 'convert'):
    return _write(params, inputs, outputs, grads, config, input_path, output_dir,
                  do_verify)


def _write(params, inputs, outputs, grads, config, input_path: str, output_dir: str,
           do_verify: bool) -> dict:
  store = ckpt_lib.CheckpointStore(output_dir)
  if store.all_steps():
    raise CheckpointError(f'{store.directory} already holds checkpoints',
                          hint='choose an empty --output')
  num_items = int(params['item_emb']['embedding'].shape[0] - 1)
  num_behaviors = int(params['behavior_emb']['embedding'].shape[0] - 1)
  meta = dict(epoch=-1, step=0, config=config.to_dict(), converted_from=
              os.path.abspath(input_path), num_items=num_items,
              num_behaviors=num_behaviors)
  store.save(0, params=params, train=None, iterator=None, meta=meta, monitor=None)
  store.wait()
  store.close()
  run_log.write_json(os.path.join(output_dir, 'config.json'), config.to_dict())
  report = {'output': os.path.abspath(output_dir), 'num_items': num_items,
            'num_behaviors': num_behaviors, 'd_model': config.model.d_model,
            'n_layer': config.model.n_layer, 'n_head': config.model.n_head,
            'num_params': layers.count_params(params)}
  if do_verify:
    report['verify'] = verify(params, config, inputs, outputs, grads)
  return report
