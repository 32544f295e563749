"""PyTorch GEAR, written from the model of docs/model.md, as a side-by-side speed baseline.

It builds the model the way the public (PyTorch) implementation does, with the same module
and state_dict names, so that it loads the parity fixture directly.

  # numerical parity against the reference fixture (exit 1 on failure)
  TORCH_PYTHON scripts/reference_torch.py --verify \
      [tests/fixtures/gear_reference_small.npz]

  # timing: training step (forward + loss + backward + Adam) and evaluation scoring
  TORCH_PYTHON scripts/reference_torch.py [--items 99037] [--batch 128]
      [--max_len 50] [--d_model 32] [--n_head 2] [--n_layer 4] [--steps 5]
      [--threads N] [--eval_batch 1024] [--eval_users 4096] [--json]

TORCH_PYTHON is an interpreter with only numpy and torch (CPU is enough); keep torch out
of the project's environment.

Caveat: under eval + no_grad, nn.TransformerEncoderLayer takes PyTorch's "fast path", which
turns a float attention mask into a boolean one (any nonzero entry is masked; pytorch issues
#107084, #118628), so the behavior block's time bias is silently replaced by "attend to the
diagonal only". Evaluation here therefore disables the fast path (correct scores) unless
--fastpath is given (what unmodified reference code gets under torch.no_grad).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# the repository's parity fixture, as for the tests (tests/conftest.py)
DEFAULT_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests',
                               'fixtures', 'gear_reference_small.npz')


def encoder_layer(d: int, n_head: int, dropout: float) -> nn.TransformerEncoderLayer:
  # post-norm, ReLU, FFN 4d, LayerNorm eps 1e-5: PyTorch's defaults
  return nn.TransformerEncoderLayer(d, n_head, dim_feedforward=4 * d, dropout=dropout,
                                    batch_first=True)


def causal_mask(n: int, device=None) -> torch.Tensor:
  """Float mask [n, n]: 0 where position t may attend (<= t), -inf above the diagonal."""
  return torch.triu(torch.full((n, n), float('-inf'), device=device), diagonal=1)


class GEAR(nn.Module):
  """Item block + time-biased behavior block, interleaved, then n_layer causal blocks."""

  def __init__(self, num_items: int, n_b: int, d_model: int, n_head: int, n_layer: int,
               dropout: float):
    super().__init__()
    self.n_head = n_head
    self.item_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
    nn.init.xavier_uniform_(self.item_emb.weight)  # whole matrix: row 0 is not zero
    self.behavior_emb = nn.Embedding(n_b + 1, d_model, padding_idx=0)  # N(0,1), row 0 zeroed
    self.LayerNorm = nn.LayerNorm(d_model, eps=1e-6)
    self.dropout = nn.Dropout(dropout)
    self.item_attention_blocks = nn.ModuleList([encoder_layer(d_model, n_head, dropout)])
    self.behavior_attention_blocks = nn.ModuleList([encoder_layer(d_model, n_head, dropout)])
    self.upper_transformer = nn.ModuleList(
        [encoder_layer(d_model, n_head, dropout) for _ in range(n_layer)])
    # per-head ALiBi-style slopes for the time bias: 2 ** (-8 h / H)
    slopes = torch.tensor([2.0 ** (-8.0 * h / n_head) for h in range(n_head)])
    self.register_buffer('slopes', slopes, persistent=False)

  def time_bias_mask(self, gaps: torch.Tensor) -> torch.Tensor:
    """Causal mask + per-head -s_h log(1 + max(T, 0)), as [B*H, L, L] (b-major)."""
    b, n = gaps.shape
    c = torch.cumsum(gaps.float(), dim=1)                       # [B, L]
    t = c[:, :, None] - c[:, None, :]                           # [B, L, L]  c_i - c_j
    t = torch.tril(t, diagonal=-1)                              # only j < i, else 0
    bias = -self.slopes[None, :, None, None] * torch.log(1 + t.clamp(min=0))[:, None]
    mask = bias + causal_mask(n, gaps.device)                   # [B, H, L, L]
    return mask.reshape(b * self.n_head, n, n)

  def forward(self, items: torch.Tensor, behaviors: torch.Tensor,
              gaps: torch.Tensor) -> torch.Tensor:
    """items [B, L-1], behaviors [B, L], gaps [B, L] -> hidden states [B, 2L-1, d]."""
    b, n = behaviors.shape
    # 1. item stream
    x_i = self.LayerNorm(self.dropout(self.item_emb(items)))    # [B, L-1, d]
    for blk in self.item_attention_blocks:
      x_i = blk(x_i, src_mask=causal_mask(n - 1, items.device))
    # 2. behavior stream with the time bias
    x_b = self.LayerNorm(self.dropout(self.behavior_emb(behaviors)))  # [B, L, d]
    mask = self.time_bias_mask(gaps)
    for blk in self.behavior_attention_blocks:
      x_b = blk(x_b, src_mask=mask)
    # 3. dropout, interleave b_1, i_1, b_2, ..., i_{L-1}, b_L
    x_i, x_b = self.dropout(x_i), self.dropout(x_b)
    pairs = torch.stack([x_b[:, :-1], x_i], dim=2).reshape(b, 2 * (n - 1), -1)
    x = torch.cat([pairs, x_b[:, -1:]], dim=1)                  # [B, 2L-1, d]
    # 4. upper causal blocks (padded positions are attended to, as in the reference)
    upper_mask = causal_mask(2 * n - 1, items.device)
    for blk in self.upper_transformer:
      x = blk(x, src_mask=upper_mask)
    return x

  def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5. tied heads: behavior positions -> all V+1 items, item positions -> n_b+1 behaviors."""
    logits_item = h[:, 0::2] @ self.item_emb.weight.T           # [B, L, V+1]
    logits_behavior = h[:, 1::2] @ self.behavior_emb.weight.T   # [B, L-1, n_b+1]
    return logits_item, logits_behavior

  def scores(self, h: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """6. output at the last position (b_L) dotted with E_item[candidates] -> [B, C]."""
    return torch.einsum('bd,bcd->bc', h[:, -1], self.item_emb(candidates))


def gear_loss(logits_item, logits_behavior, items, behaviors, alpha: float) -> torch.Tensor:
  """CE over items at the L behavior positions + alpha * CE over behaviors b_2..b_L.

  Each term is a mean over the non-padded positions of the whole batch (label 0 ignored).
  """
  v = logits_item.shape[-1]
  nb = logits_behavior.shape[-1]
  loss_item = F.cross_entropy(logits_item.reshape(-1, v), items.reshape(-1), ignore_index=0)
  loss_beh = F.cross_entropy(logits_behavior.reshape(-1, nb), behaviors[:, 1:].reshape(-1),
                             ignore_index=0)
  return loss_item + alpha * loss_beh


def train_loss(model: GEAR, items, behaviors, gaps, alpha: float = 0.1):
  h = model(items[:, :-1], behaviors, gaps)
  logits_item, logits_behavior = model.logits(h)
  return gear_loss(logits_item, logits_behavior, items, behaviors, alpha), h, \
      logits_item, logits_behavior


# ----------------------------------------------------------------------------- parity


def verify(path: str) -> int:
  torch.set_default_dtype(torch.float32)
  z = np.load(path)
  cfg = json.loads(str(z['config_json']))
  model = GEAR(cfg['num_items'], cfg['n_b'], cfg['d_model'], cfg['n_head'], cfg['n_layer'],
               cfg.get('dropout', 0.2))
  state = {k[len('param/'):]: torch.from_numpy(z[k]) for k in z.files if k.startswith('param/')}
  model.load_state_dict(state, strict=True)
  model.eval()  # the fixture was made without dropout
  inp = {k: torch.from_numpy(z['input/' + k])
         for k in ('items', 'behaviors', 'time_gaps', 'candidates')}
  loss, h, logits_item, logits_behavior = train_loss(
      model, inp['items'], inp['behaviors'], inp['time_gaps'], cfg['alpha'])
  loss.backward()
  scores = model.scores(h, inp['candidates'])
  with torch.no_grad():  # the evaluation path: no_grad, encoder fast path disabled
    torch.backends.mha.set_fastpath_enabled(False)
    h_eval = model(inp['items'][:, :-1], inp['behaviors'], inp['time_gaps'])
    scores_eval = model.scores(h_eval, inp['candidates'])

  def err(a: torch.Tensor, key: str) -> float:
    return float(np.abs(a.detach().numpy() - z[key.split(' ')[0]]).max())

  # sanity check of our time matrix against the one the fixture shipped
  c = torch.cumsum(inp['time_gaps'].float(), 1)
  t = torch.tril(c[:, :, None] - c[:, None, :], diagonal=-1)
  print(f'time matrix T (sanity)     max abs err {err(t, "input/time_bias"):.3e}')
  outputs = {'output/logits_item': logits_item, 'output/logits_behavior': logits_behavior,
             'output/scores': scores, 'output/loss': loss,
             'output/scores (no_grad)': scores_eval}
  failed = False
  for key, value in outputs.items():
    e = err(value, key)
    failed |= e > 1e-4
    print(f'{key:<26} max abs err {e:.3e}{"  FAIL" if e > 1e-4 else ""}')
  grads = {n: p.grad for n, p in model.named_parameters()}
  missing = [n for n in grads if 'grad/' + n not in z.files]
  gerr = {n: err(g, 'grad/' + n) for n, g in grads.items() if n not in missing}
  worst = max(gerr, key=gerr.get)
  failed |= gerr[worst] > 1e-5 or bool(missing)
  print(f'{"grad/* (" + str(len(gerr)) + " tensors)":<26} max abs err {gerr[worst]:.3e}'
        f' (worst: {worst}){"  FAIL" if gerr[worst] > 1e-5 else ""}')
  for n in sorted(gerr, key=gerr.get, reverse=True)[:3]:
    print(f'    {n:<52} {gerr[n]:.3e}')
  if missing:
    print('  FAIL: no fixture gradient for', missing)
  # informational: one Adam step, compared only where |grad| > 1e-5 (see the spec)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
  opt.step()
  aerr = 0.0
  for n, p in model.named_parameters():
    sel = np.abs(z['grad/' + n]) > 1e-5
    if sel.any():
      aerr = max(aerr, float(np.abs(p.detach().numpy() - z['adam_step/' + n])[sel].max()))
  print(f'{"adam_step/* (info)":<26} max abs err {aerr:.3e}  (where |grad| > 1e-5)')
  print('PASS' if not failed else 'FAIL')
  return 1 if failed else 0


# ----------------------------------------------------------------------------- timing


def synthetic_batch(rng: np.random.Generator, batch: int, max_len: int, items: int,
                    behaviors: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """Random left-padded windows, lengths 3..L; the same recipe as scripts/benchmark.py."""
  lengths = rng.integers(3, max_len + 1, batch)
  real = np.arange(max_len)[None] >= (max_len - lengths)[:, None]
  it = np.where(real, rng.integers(1, items + 1, (batch, max_len)), 0)
  be = np.where(real, rng.integers(1, behaviors + 1, (batch, max_len)), 0)
  ga = np.where(real, rng.integers(0, 100_000, (batch, max_len)), 0)
  return (torch.from_numpy(it.astype(np.int64)), torch.from_numpy(be.astype(np.int64)),
          torch.from_numpy(ga.astype(np.float32)))


def time_training(model: GEAR, args, rng) -> dict:
  opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
  batches = [synthetic_batch(rng, args.batch, args.max_len, args.items) for _ in range(4)]
  model.train()
  times = []
  for i in range(2 + args.steps):  # 2 warm-up steps, not timed
    items, behaviors, gaps = batches[i % len(batches)]
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = train_loss(model, items, behaviors, gaps, alpha=0.1)[0]
    loss.backward()
    opt.step()
    if not math.isfinite(loss.item()):
      raise FloatingPointError(f'loss is {loss.item()} at step {i}')
    if i >= 2:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  return dict(step_s=round(step_s, 4), step_s_min=round(min(times), 4),
              train_seq_per_s=round(args.batch / step_s, 1), loss=round(loss.item(), 4))


@torch.no_grad()
def time_eval(model: GEAR, args, rng) -> dict:
  model.eval()
  torch.backends.mha.set_fastpath_enabled(args.fastpath)  # see the module docstring
  n_batches = max(1, math.ceil(args.eval_users / args.eval_batch))
  batches = []
  for _ in range(1 + n_batches):
    items, behaviors, gaps = synthetic_batch(rng, args.eval_batch, args.max_len, args.items)
    cands = torch.from_numpy(rng.integers(1, args.items + 1, (args.eval_batch, 100)))
    batches.append((items[:, :-1], behaviors, gaps, cands))

  def score(batch):
    items, behaviors, gaps, cands = batch
    return model.scores(model(items, behaviors, gaps), cands)

  score(batches[0])  # warm-up
  t = time.perf_counter()
  for batch in batches[1:]:
    score(batch)
  elapsed = time.perf_counter() - t
  return dict(eval_users_per_s=round(n_batches * args.eval_batch / elapsed, 1))


def peak_rss_mb() -> float:
  """This process's peak RSS. VmHWM belongs to the address space made by exec, whereas
  ru_maxrss survives exec on Linux and would report the (larger) parent that spawned us."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--verify', nargs='?', const=DEFAULT_FIXTURE, default=None,
                      metavar='PATH', help='check parity against the reference fixture')
  parser.add_argument('--items', type=int, default=99_037)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--max_len', type=int, default=50)
  parser.add_argument('--d_model', type=int, default=32)
  parser.add_argument('--n_head', type=int, default=2)
  parser.add_argument('--n_layer', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5, help='timed training steps')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--eval_batch', type=int, default=1024)
  parser.add_argument('--eval_users', type=int, default=4096)
  parser.add_argument('--fastpath', action='store_true',
                      help='let evaluation use the (mask-breaking) encoder fast path')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  if args.verify is not None:
    return verify(args.verify)

  torch.manual_seed(42)
  rng = np.random.default_rng(0)
  model = GEAR(args.items, 4, args.d_model, args.n_head, args.n_layer, dropout=0.2)
  result = {'impl': 'pytorch-reference', 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'items': args.items, 'batch': args.batch,
            'max_len': args.max_len}
  if args.fastpath:
    result['eval_fastpath'] = True
  train = time_training(model, args, rng)
  loss = train.pop('loss')
  result.update(train)
  result.update(time_eval(model, args, rng))
  result['peak_rss_mb'] = round(peak_rss_mb(), 1)
  if args.json:
    print(json.dumps(result))
    return 0
  params = sum(p.numel() for p in model.parameters())
  print(f'PyTorch GEAR reference (torch {result["torch"]}, {result["threads"]} threads): '
        f'{args.items:,} items, batch {args.batch} x {args.max_len}, d {args.d_model}, '
        f'{args.n_layer} upper layers, {params:,} parameters, last loss {loss:.3f}')
  rows = [('train step (s, median)', f'{result["step_s"]:.4f}'),
          ('train step (s, min)', f'{result["step_s_min"]:.4f}'),
          ('train sequences/s', f'{result["train_seq_per_s"]:,.0f}'),
          ('eval users/s (1 + 99 candidates)', f'{result["eval_users_per_s"]:,.0f}'),
          ('peak host RSS (MB)', f'{result["peak_rss_mb"]:,.0f}')]
  for name, value in rows:
    print(f'  {name:<40}{value:>14}')
  sys.stdout.flush()
  return 0


if __name__ == '__main__':
  sys.exit(main())
