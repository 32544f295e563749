"""A realistic synthetic multi-behavior data set in the reference raw format.

One interaction per line, tab separated, no header: ``user item behavior timestamp``,
behaviors ``pv``, ``fav``, ``cart``, ``buy``, users ``1..U``, items in ``1..I`` (not every
item occurs), epoch seconds from about 1.5e9, lines grouped by user in time order.

The generative story (all knobs of `generate` have defaults):

- World. Items fall into categories of varied size; inside a category, item popularity
  is Zipf-like. Every item has a few weighted "successors" (items browsed or bought
  next), mostly in its own category.
- Users. Each user likes a few categories (Dirichlet weights) and has a heavy-tailed
  (log-normal) budget of page views: min 3 interactions, median about 25, some users
  with hundreds.
- Sessions. A session starts on a popular item of a liked category (or continues from
  where the last one ended); each next view follows a successor of the current item,
  goes back to an item viewed earlier in the session, or jumps inside the category or
  to another liked one. Gaps are seconds to minutes inside a session and hours to days
  between sessions.
- Funnel. A view may add ``fav`` and ``cart`` on the same item; a ``buy`` lands on the
  carted item (possibly carted sessions ago), an item viewed a few steps earlier, or a
  successor of the current item. A buy usually ends the session, and a user's history
  ends at a session end, so about half the users end on a buy (the leave-one-out
  validation cases). About 75% of interactions are pv, 5-6% fav, 8-9% cart, 10% buy.

The leave-one-out validation task is therefore not solved by item popularity (sampled
NDCG@10 with 99 random negatives: 0.12-0.15 on the funnel preset) while a first-order
transition model (count of last item -> candidate) scores about 0.6, which leaves a
sequence model little to add.

Goal sessions (``goal_sessions=True``, the ``demo`` preset; `_simulate_goals`) replace
the funnel with signals only a multi-behavior, time-aware model reads: each session
views neighbours of a goal item, carts the goal, wanders to other categories and buys
the goal minutes later, among decoy carts, repeated views and favourites; carts left
in earlier sessions are seldom bought days later. There popularity scores 0.20, item
transitions 0.32, SASRec 0.65 and GEAR 0.80 (sampled val NDCG@10, configs/demo.py).

Generation is vectorised over users: one numpy step per page view of all active users
at once (70,000 users, 2.3 M interactions in a few seconds). The output is a function of
(num_users, num_items, seed, knobs) only: identical bytes for identical arguments.

CLI::

  python -m gear_jax.data.synthetic --out data/demo.txt --preset demo      # goal sessions
  python -m gear_jax.data.synthetic --out /tmp/x.txt --users 1000 --items 500 --seed 3
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import numpy as np

from gear_jax import atomic
from gear_jax.errors import ConfigError

# `generate` returns behaviors as uint8 codes indexing this tuple (0 = pv ... 3 = buy).
BEHAVIORS = ('pv', 'fav', 'cart', 'buy')
PV, FAV, CART, BUY = range(4)

PRESETS = {
    # unit tests: about 4,000 interactions, every user leaves >= 100 items untouched
    'test': dict(num_users=300, num_items=150),
    # configs/demo.py: goal sessions, which plant what only a multi-behavior, time-aware
    # model reads (`_simulate_goals`); GEAR (d=32, L=50) trains in minutes on 2 cores
    'demo': dict(num_users=4000, num_items=1500, goal_sessions=True),
    # the view -> fav/cart -> buy funnel at the demo's size (the demo before goal
    # sessions replaced it)
    'funnel': dict(num_users=4000, num_items=1500),
    # throughput benchmark: about 2.3 M interactions, retail-like item/user ratio
    'bench': dict(num_users=70000, num_items=50000),
}

START_TIME = 1_500_000_000  # epoch seconds of the earliest possible first interaction
_DAY = 86400.0


def _defaults(num_items: int) -> dict:
  """Default knobs. Tiny catalogues get short histories (see `median_len`)."""
  return dict(
      # --- world
      num_categories=None,     # None: about one category per 40 items
      zipf_a=0.8,              # within-category popularity ~ rank ** -zipf_a
      num_successors=4,        # successor items per item
      successor_weights=(0.4, 0.3, 0.2, 0.1),  # probability of each successor
      successor_same_cat=0.85,  # P(successor in the item's own category)
      successor_pop_a=0.0,     # same-category successors ~ popularity ** this
      cat_pop_sigma=0.3,       # log-normal spread of category popularity per item
      # --- users
      median_len=None,         # median page-view budget per user; None: clip(I/30, 4, 14.5)
      len_sigma=0.8,           # log-normal sigma of the page-view budget
      max_views=2000,          # cap on a user's page-view budget
      num_liked=3,             # liked categories per user
      p_explore=0.1,           # P(a session starts in a random category)
      # --- browsing
      p_continue=0.25,         # P(a session starts at a successor of the last item)
      p_follow=0.7,            # P(next view = a successor of the current item)
      p_back=0.08,             # P(next view = an item viewed earlier in the session)
      p_jump_same_cat=0.5,     # P(a jump stays in the current category)
      # --- funnel (per page view)
      p_fav=0.073,
      p_cart=0.113,
      p_buy=0.133,
      buy_mix=(0.45, 0.2, 0.35),  # buy target: carted item, earlier view, successor
      p_end_after_buy=0.7,     # P(session ends after a buy)
      p_end=0.09,              # P(session ends after a view without a buy)
      # --- time (seconds)
      start_span_days=90.0,    # users start uniformly within this many days
      gap_view=40.0,           # median gap between views in a session
      gap_action=12.0,         # median gap from a view to its fav / cart / buy
      gap_session_hours=16.0,  # median gap between sessions
      # --- goal sessions (the 'demo' preset; off by default, see `_simulate_goals`)
      goal_sessions=False,     # each session pursues a goal item; replaces the funnel above
      num_neighbours=10,       # neighbours per goal item (same category, uniform)
      p_hint=0.5,              # P(a view is a neighbour of the session's goal)
      p_cart_goal=0.2,         # P(at a view: view the goal and cart it), once a session
      p_again=0.12,            # P(the viewed item is viewed once more right away)
      p_cart_other=0.04,       # P(an item that is not the goal is carted, never bought)
      p_wander=0.7,            # P(a view after the goal's cart is in a random category)
      p_buy_cart=0.35,         # P(a view after the goal's cart ends in buying it)
      p_buy_direct=0.04,       # P(a buy without a cart this session)
      p_buy_old_cart=0.3,      # ... of which on a cart left in an earlier session
      # --- output
      min_untouched=100,       # histories are cut so each user leaves this many of the
                               # occurring items untouched (99 sampled negatives)
  )


def generate(num_users: int, num_items: int, *, seed: int = 0,
             **knobs) -> dict[str, np.ndarray]:
  """Generates interactions, sorted by user then time.

  Returns columns of equal length: ``user`` int64 (1..num_users, every user present),
  ``item`` int64 (1..num_items), ``behavior`` uint8 codes into `BEHAVIORS`
  (0 pv, 1 fav, 2 cart, 3 buy) and ``timestamp`` int64 epoch seconds (strictly
  increasing within a user). Knobs: see `_defaults`.
  """
  if num_users < 1 or num_items < 20:
    raise ConfigError(f'need num_users >= 1 and num_items >= 20, got {num_users}, '
                     f'{num_items}')
  k = _defaults(num_items)
  unknown = set(knobs) - set(k)
  if unknown:
    raise TypeError(f'unknown knobs {sorted(unknown)}; known: {sorted(k)}')
  k.update(knobs)
  if k['median_len'] is None:
    k['median_len'] = float(np.clip(num_items / 30, 4, 14.5))
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6EA2]))
  world = _World(num_items, k, rng)
  if k['goal_sessions']:
    cols = _simulate_goals(world, num_users, k, rng)
  else:
    cols = _simulate(world, num_users, k, rng)
  return _cap_distinct(cols, int(k['min_untouched']))


class _World:
  """Categories, popularity and successor tables (items are 1..I; row 0 is unused)."""

  def __init__(self, num_items: int, k: dict, rng: np.random.Generator):
    n_succ = int(k['num_successors'])
    min_size = n_succ + 2
    if num_items < 2 * min_size:
      raise ConfigError(f'need num_items >= {2 * min_size} for {n_succ} successors')
    c = k['num_categories'] or max(2, round(num_items / 40))
    c = int(max(1, min(c, num_items // min_size)))
    weights = rng.lognormal(0.0, 0.7, c)
    sizes = min_size + rng.multinomial(num_items - c * min_size, weights / weights.sum())
    self.num_categories = c
    # items in category order, most popular first inside each category (ids shuffled)
    self.items = rng.permutation(num_items).astype(np.int64) + 1
    self.start = np.concatenate([[0], np.cumsum(sizes)])
    self.cat_of_pos = np.repeat(np.arange(c), sizes)
    self.item_cat = np.zeros(num_items + 1, np.int64)
    self.item_cat[self.items] = self.cat_of_pos
    rank = np.arange(num_items) - self.start[self.cat_of_pos]
    pop = (rank + 1.0) ** -float(k['zipf_a'])
    self.pop_cdf = self._segment_cdf(pop)
    self.succ_cdf = self._segment_cdf(pop ** float(k['successor_pop_a']))
    cat_w = sizes * rng.lognormal(0.0, float(k['cat_pop_sigma']), c)
    self.cat_p = cat_w / cat_w.sum()
    self.cat_cdf = np.cumsum(self.cat_p)
    self.cat_cdf[-1] = 1.0
    # successors: same category (popularity-tempered) or anywhere (popularity), not self
    succ = np.zeros((num_items + 1, n_succ), np.int64)
    src = np.repeat(np.arange(1, num_items + 1), n_succ)
    redo = np.ones(len(src), bool)
    while redo.any():
      idx = np.flatnonzero(redo)
      n = len(idx)
      same = rng.random(n) < k['successor_same_cat']
      cat = np.where(same, self.item_cat[src[idx]], self.sample_cats(rng, n))
      pick_same = self.sample_in_cats(rng, cat, self.succ_cdf)
      pick_pop = self.sample_in_cats(rng, cat, self.pop_cdf)
      flat = succ.reshape(-1)  # a view: row 0 (item 0) is unused
      flat[n_succ + idx] = np.where(same, pick_same, pick_pop)
      redo[idx] = flat[n_succ + idx] == src[idx]
    self.succ = succ
    w = np.asarray(k['successor_weights'], np.float64)
    if len(w) != n_succ:
      raise ConfigError(f'successor_weights needs {n_succ} entries, got {len(w)}')
    self.succ_w_cdf = np.cumsum(w / w.sum())
    self.succ_w_cdf[-1] = 1.0

  def _segment_cdf(self, w: np.ndarray) -> np.ndarray:
    """Per-category cumulative probabilities, offset by the category index."""
    seg_sum = np.add.reduceat(w, self.start[:-1])
    cum = np.cumsum(w)
    before = np.concatenate([[0.0], cum[self.start[1:-1] - 1]])
    cdf = (cum - before[self.cat_of_pos]) / seg_sum[self.cat_of_pos] + self.cat_of_pos
    cdf[self.start[1:] - 1] = np.arange(1, self.num_categories + 1)  # exact segment ends
    return cdf

  def sample_cats(self, rng: np.random.Generator, n: int) -> np.ndarray:
    return np.minimum(np.searchsorted(self.cat_cdf, rng.random(n), side='right'),
                      self.num_categories - 1)

  def sample_in_cats(self, rng: np.random.Generator, cats: np.ndarray,
                     cdf: np.ndarray) -> np.ndarray:
    """One item per entry of `cats`, drawn with the segment distribution `cdf`."""
    pos = np.searchsorted(cdf, cats + rng.random(len(cats)), side='right')
    pos = np.clip(pos, self.start[cats], self.start[cats + 1] - 1)
    return self.items[pos]

  def successor(self, items: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A weighted successor of each item, chosen by the uniforms `u`."""
    j = np.minimum(np.searchsorted(self.succ_w_cdf, u, side='right'),
                   self.succ.shape[1] - 1)
    return self.succ[items, j]


def _lognormal_gap(rng: np.random.Generator, median: float, sigma: float, n: int,
                   cap: float) -> np.ndarray:
  g = median * np.exp(sigma * rng.standard_normal(n))
  return np.clip(np.rint(g), 1, cap).astype(np.int64)


def _population(world: _World, num_users: int, k: dict, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Each user's liked categories [U, n], their cumulative weights [U, n], page-view
  budget [U] and start time [U] (epoch seconds)."""
  n_liked = int(k['num_liked'])
  liked = world.sample_cats(rng, num_users * n_liked).reshape(num_users, n_liked)
  liked_cdf = np.cumsum(rng.dirichlet(np.ones(n_liked), num_users), axis=1)
  budget = np.rint(k['median_len'] * np.exp(k['len_sigma'] *
                                            rng.standard_normal(num_users)))
  budget = np.clip(budget, 3, k['max_views']).astype(np.int64)
  t = START_TIME + np.floor(rng.random(num_users) * k['start_span_days'] * _DAY
                            ).astype(np.int64)
  return liked, liked_cdf, budget, t


def _home(world: _World, liked: np.ndarray, liked_cdf: np.ndarray, u0: np.ndarray,
          u1: np.ndarray, k: dict, rng: np.random.Generator) -> np.ndarray:
  """The category each active user browses: a liked one by its weight (uniforms u0),
  or a random one with probability p_explore (u1)."""
  j = (u0[:, None] > liked_cdf).sum(axis=1)
  home = liked[np.arange(len(liked)), np.minimum(j, liked.shape[1] - 1)]
  return np.where(u1 < k['p_explore'], world.sample_cats(rng, len(liked)), home)


class _Events:
  """The interactions emitted step by step, as columns sorted by user then time."""

  def __init__(self):
    self.parts = {name: [] for name in ('user', 'item', 'behavior', 'timestamp')}

  def emit(self, uid, mask, items, code, times) -> None:
    self.parts['user'].append(uid[mask])
    self.parts['item'].append(items[mask])
    self.parts['behavior'].append(np.full(int(mask.sum()), code, np.uint8))
    self.parts['timestamp'].append(times[mask])

  def columns(self) -> dict[str, np.ndarray]:
    cols = {name: np.concatenate(parts) for name, parts in self.parts.items()}
    order = np.argsort(cols['user'], kind='stable')  # steps are in time order per user
    cols = {name: col[order] for name, col in cols.items()}
    cols['user'] = cols['user'].astype(np.int64) + 1
    return cols


def _view_gap(rng: np.random.Generator, new_session: np.ndarray, k: dict
              ) -> np.ndarray:
  """Seconds from each active user's last event to its next view: hours to days at a
  session start, seconds to minutes inside a session (both drawn for every user)."""
  a = len(new_session)
  return np.where(new_session,
                  _lognormal_gap(rng, k['gap_session_hours'] * 3600, 1.3, a, 60 * _DAY),
                  _lognormal_gap(rng, k['gap_view'], 1.0, a, 3600))


def _action_gap(rng: np.random.Generator, mask: np.ndarray, k: dict,
                scale: float = 1.0) -> np.ndarray:
  """Seconds from a view to its fav / cart / buy where `mask` holds, else 0."""
  return mask * _lognormal_gap(rng, k['gap_action'] * scale, 0.8, len(mask), 3600)


def _simulate(world: _World, num_users: int, k: dict,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The view -> fav/cart -> buy funnel: steps all active users one page view at a
  time (`_next_view`, then `_funnel` on the viewed item, then the session may end)."""
  liked, liked_cdf, budget, t = _population(world, num_users, k, rng)
  buy_cdf = np.cumsum(np.asarray(k['buy_mix'], np.float64) / np.sum(k['buy_mix']))
  back = 4  # items remembered per session (for going back / buying an earlier view)
  uid = np.arange(num_users)
  cur = np.zeros(num_users, np.int64)  # 0: no item yet
  cart = np.zeros(num_users, np.int64)  # pending carted item, 0: none
  recent = np.zeros((num_users, back), np.int64)  # earlier views in this session
  done = np.zeros(num_users, np.int64)
  new_session = np.ones(num_users, bool)
  events = _Events()
  step = 0
  while len(uid):
    a = len(uid)
    u = rng.random((a, 12))
    # --- the next page view and its time
    item, back_item = _next_view(world, liked[uid], liked_cdf[uid], cur, recent,
                                 new_session, u, k, rng)
    gap = _view_gap(rng, new_session, k)
    if step:  # every user's first view is at its start time
      t = t + gap
    step += 1
    recent = np.where(new_session[:, None], 0, recent)
    events.emit(uid, np.ones(a, bool), item, PV, t)
    # --- funnel on the viewed item
    t, cart, buy = _funnel(world, events, uid, item, back_item, cart, t, u, buy_cdf, k,
                           rng)
    # --- advance the session
    recent[:, 1:] = recent[:, :-1]
    recent[:, 0] = item
    cur = item
    done += 1
    end_u = rng.random(a)
    new_session = np.where(buy, end_u < k['p_end_after_buy'], end_u < k['p_end'])
    keep = ~(new_session & (done >= budget[uid]))
    if not keep.all():
      uid, t, cur, cart, recent, done, new_session = (
          x[keep] for x in (uid, t, cur, cart, recent, done, new_session))

  return events.columns()


def _next_view(world: _World, liked: np.ndarray, liked_cdf: np.ndarray,
               cur: np.ndarray, recent: np.ndarray, new_session: np.ndarray,
               u: np.ndarray, k: dict, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
  """The item each active user views next, and an earlier view of the session it can
  go back to (0 when the session has none).

  A session starts at a successor of the last item (`p_continue`) or a popular item of
  the home category; inside a session the next view follows a successor of the
  current item (`p_follow`), goes back to an earlier view (`p_back`), or jumps to a
  popular item of the current category (`p_jump_same_cat`) or of the home one."""
  a = len(cur)
  home = _home(world, liked, liked_cdf, u[:, 0], u[:, 1], k, rng)
  cur_cat = world.item_cat[cur]
  jump_cat = np.where(u[:, 2] < k['p_jump_same_cat'], cur_cat, home)
  jump_cat = np.where(cur == 0, home, jump_cat)
  entry = world.sample_in_cats(rng, np.where(new_session, home, jump_cat),
                               world.pop_cdf)
  follow = world.successor(cur, u[:, 3])
  n_recent = (recent > 0).sum(axis=1)  # valid slots form a prefix (newest first)
  back_j = np.minimum((u[:, 4] * n_recent).astype(np.int64), recent.shape[1] - 1)
  back_item = recent[np.arange(a), back_j]  # 0 when the session has no earlier view
  r = u[:, 5]
  in_session = np.where(r < k['p_follow'], follow,
                        np.where((r < k['p_follow'] + k['p_back']) & (back_item > 0),
                                 back_item, entry))
  at_start = np.where((u[:, 6] < k['p_continue']) & (cur > 0), follow, entry)
  return np.where(new_session, at_start, in_session), back_item


def _funnel(world: _World, events: _Events, uid: np.ndarray, item: np.ndarray,
            back_item: np.ndarray, cart: np.ndarray, t: np.ndarray, u: np.ndarray,
            buy_cdf: np.ndarray, k: dict, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Emits the fav, cart and buy that follow the view of `item`.

  A view may add ``fav`` and ``cart`` on the item; a ``buy`` (`p_buy`) lands, by
  `buy_mix`, on the pending carted item, an earlier view of the session or a
  successor of the item. Returns (time of the last event, pending cart, buy mask)."""
  fav = u[:, 7] < k['p_fav']
  t = t + _action_gap(rng, fav, k)
  events.emit(uid, fav, item, FAV, t)
  carted = u[:, 8] < k['p_cart']
  t = t + _action_gap(rng, carted, k)
  events.emit(uid, carted, item, CART, t)
  cart = np.where(carted, item, cart)
  buy = u[:, 9] < k['p_buy']
  kind = np.searchsorted(buy_cdf, u[:, 10], side='right')
  # carted item, else an earlier view of the session, else the viewed item itself
  earlier = np.where(back_item > 0, back_item, item)
  target = np.where(kind == 0, np.where(cart > 0, cart, earlier),
                    np.where(kind == 1, earlier, world.successor(item, u[:, 11])))
  t = t + buy * _lognormal_gap(rng, k['gap_action'] * 2.5, 1.0, len(uid), 3600)
  events.emit(uid, buy, target, BUY, t)
  cart = np.where(buy & (target == cart), 0, cart)
  return t, cart, buy


def _simulate_goals(world: _World, num_users: int, k: dict,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Sessions with a goal: signals that only a multi-behavior, time-aware model reads.

  Each session pursues a goal item G drawn from one of the user's categories: its views
  hint at G (`_goal_view`), it may cart G and repeat, favourite or cart other items
  (`_goal_events`), and buys G minutes after its cart, or rarely without one
  (`_goal_buy`). A first-order transition model sees only the last item (often a
  neighbour of G); an item-sequence model (SASRec) can combine the neighbours seen and
  repetitions; GEAR also sees which item was carted and how long ago."""
  neighbours = _goal_neighbours(world, int(k['num_neighbours']), rng)
  liked, liked_cdf, budget, t = _population(world, num_users, k, rng)
  uid = np.arange(num_users)
  cur = np.zeros(num_users, np.int64)
  goal = np.zeros(num_users, np.int64)
  cart = np.zeros(num_users, np.int64)  # the goal carted and not bought yet, 0: none
  fresh = np.zeros(num_users, bool)  # ... carted in the current session
  since = np.zeros(num_users, np.int64)  # views since that cart
  done = np.zeros(num_users, np.int64)
  new_session = np.ones(num_users, bool)
  events = _Events()
  step = 0
  while len(uid):
    a = len(uid)
    u = rng.random((a, 13))
    # --- the session's goal
    home = _home(world, liked[uid], liked_cdf[uid], u[:, 0], u[:, 1], k, rng)
    goal = np.where(new_session, world.sample_in_cats(rng, home, world.pop_cdf), goal)
    fresh &= ~new_session
    # --- the view and what follows it on the same item
    item, cart_goal = _goal_view(world, neighbours, goal, cur, fresh, new_session, u, k,
                                 rng)
    gap = _view_gap(rng, new_session, k)
    if step:
      t = t + gap
    step += 1
    t = _goal_events(events, uid, item, cart_goal, t, u, k, rng)
    cart = np.where(cart_goal, goal, cart)
    since = np.where(cart_goal, 0, since + 1)
    fresh |= cart_goal
    # --- the buy
    t, buy, target = _goal_buy(events, uid, goal, cart, fresh, since, t, u, k, rng)
    cart = np.where(buy & (target == cart), 0, cart)
    fresh &= ~buy
    # --- advance the session
    cur = item
    done += 1
    end_u = u[:, 11]
    new_session = np.where(buy, end_u < k['p_end_after_buy'], end_u < k['p_end'])
    keep = ~(new_session & (done >= budget[uid]))
    if not keep.all():
      uid, t, cur, goal, cart, fresh, since, done, new_session = (
          x[keep] for x in (uid, t, cur, goal, cart, fresh, since, done, new_session))

  return events.columns()


def _goal_neighbours(world: _World, n_nb: int, rng: np.random.Generator) -> np.ndarray:
  """[I + 1, n_nb] neighbours of each item (row 0 unused): uniform draws from the
  item's category, so that one viewed neighbour points at about `num_neighbours`
  possible goals and several narrow them down."""
  num_items = len(world.items)
  cats = np.repeat(world.item_cat[1:], n_nb)
  span = (world.start[cats + 1] - world.start[cats])
  neighbours = np.zeros((num_items + 1, n_nb), np.int64)
  neighbours[1:] = world.items[world.start[cats] + (rng.random(len(cats)) * span)
                               .astype(np.int64)].reshape(num_items, n_nb)
  return neighbours


def _goal_view(world: _World, neighbours: np.ndarray, goal: np.ndarray,
               cur: np.ndarray, fresh: np.ndarray, new_session: np.ndarray,
               u: np.ndarray, k: dict, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
  """The item each active user views, and whether it is the goal viewed to be carted.

  Views of G's neighbours hint at G (`p_hint`; a session starts on one); the others
  follow the current item's successors (`p_follow`) or jump inside G's category. After
  the goal's cart a view may be in a random category (`p_wander`); once a session
  the user may view G and cart it (`p_cart_goal`)."""
  n_nb = neighbours.shape[1]
  hint = neighbours[goal, np.minimum((u[:, 2] * n_nb).astype(np.int64), n_nb - 1)]
  follow = world.successor(np.where(cur > 0, cur, goal), u[:, 3])
  jump = world.sample_in_cats(rng, world.item_cat[goal], world.pop_cdf)
  r = u[:, 4]
  item = np.where(r < k['p_hint'], hint, np.where(r < k['p_hint'] + k['p_follow'] *
                                                  (1 - k['p_hint']), follow, jump))
  wander = world.sample_in_cats(rng, world.sample_cats(rng, len(goal)), world.pop_cdf)
  item = np.where(fresh & (u[:, 12] < k['p_wander']), wander, item)
  item = np.where(new_session, hint, item)
  cart_goal = ~new_session & ~fresh & (u[:, 5] < k['p_cart_goal'])
  return np.where(cart_goal, goal, item), cart_goal


def _goal_events(events: _Events, uid: np.ndarray, item: np.ndarray,
                 cart_goal: np.ndarray, t: np.ndarray, u: np.ndarray, k: dict,
                 rng: np.random.Generator) -> np.ndarray:
  """Emits the view of `item` and, on the same item, maybe a repeated view (`p_again`)
  and a favourite (`p_fav`), so a repeated item is not a cart, and a cart: the goal's
  (`cart_goal`) or one of an item that is never bought (`p_cart_other`). Returns the
  time of the last event."""
  a = len(uid)
  events.emit(uid, np.ones(a, bool), item, PV, t)
  again = u[:, 6] < k['p_again']
  t = t + again * _lognormal_gap(rng, k['gap_view'] / 2, 1.0, a, 3600)
  events.emit(uid, again, item, PV, t)
  fav = u[:, 7] < k['p_fav']
  t = t + _action_gap(rng, fav, k)
  events.emit(uid, fav, item, FAV, t)
  carted = cart_goal | (u[:, 8] < k['p_cart_other'])
  t = t + _action_gap(rng, carted, k)
  events.emit(uid, carted, item, CART, t)
  return t


def _goal_buy(events: _Events, uid: np.ndarray, goal: np.ndarray, cart: np.ndarray,
              fresh: np.ndarray, since: np.ndarray, t: np.ndarray, u: np.ndarray,
              k: dict, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Emits the buys; returns (time of the last event, buy mask, bought item).

  A buy lands on the goal carted earlier in this session (`p_buy_cart` per later
  view: minutes after the cart); without such a cart, buys are rare (`p_buy_direct`)
  and go to the goal itself or, less often, to an item carted in an earlier session
  (days before, `p_buy_old_cart`)."""
  buy_cart = fresh & (since >= 1) & (u[:, 9] < k['p_buy_cart'])
  buy_direct = ~fresh & (u[:, 9] < k['p_buy_direct'])
  old = (cart > 0) & (u[:, 10] < k['p_buy_old_cart'])
  target = np.where(buy_cart, cart, np.where(old, cart, goal))
  buy = buy_cart | buy_direct
  t = t + _action_gap(rng, buy, k, 2.5)
  events.emit(uid, buy, target, BUY, t)
  return t, buy, target


def _cap_distinct(cols: dict[str, np.ndarray], min_untouched: int
                  ) -> dict[str, np.ndarray]:
  """Cuts histories so that every user leaves `min_untouched` occurring items untouched.

  Only binds for tiny catalogues (the `test` preset); a cut keeps a prefix of at least
  3 distinct items. A cut can drop an item's last occurrence, hence the re-check.
  """
  for _ in range(10):
    n_occ = len(np.unique(cols['item']))
    limit = max(n_occ - min_untouched, 3)
    user, item = cols['user'], cols['item']
    # first occurrence of each (user, item) pair, then a running count per user
    order = np.lexsort((np.arange(len(item)), item, user))
    first = np.ones(len(item), bool)
    first[order[1:]] = (user[order[1:]] != user[order[:-1]]) | (
        item[order[1:]] != item[order[:-1]])
    cum = np.cumsum(first)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    per_user_base = np.repeat(cum[starts] - 1, np.diff(np.r_[starts, len(user)]))
    distinct = cum - per_user_base
    keep = distinct <= limit
    if keep.all():
      return cols
    cols = {name: col[keep] for name, col in cols.items()}
  return cols


# ------------------------------------------------------------------------ writing

def _digits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ASCII digits of non-negative ints, right-aligned: ([N, W] uint8, [N, W] mask)."""
  x = np.asarray(x, np.int64)
  if len(x) and x.min() < 0:
    raise ValueError('negative values are not supported')
  width = max(1, len(str(int(x.max())))) if len(x) else 1
  d = np.empty((len(x), width), np.uint8)
  mask = np.empty((len(x), width), bool)
  rest = x.copy()
  for j in range(width - 1, -1, -1):
    d[:, j] = (rest % 10 + 48).astype(np.uint8)
    mask[:, j] = (rest > 0) | (j == width - 1)
    rest //= 10
  return d, mask


def _encode_lines(columns: dict[str, np.ndarray]) -> bytes:
  """The reference TSV format as bytes, built column-wise with numpy."""
  beh = np.asarray(columns['behavior'])
  if beh.dtype.kind in 'US':
    names, codes = np.unique(beh.astype(str), return_inverse=True)
  else:
    names, codes = np.asarray(BEHAVIORS), beh.astype(np.int64)
  width = max(len(n) for n in names)
  table = np.zeros((len(names), width), np.uint8)
  table_mask = np.zeros((len(names), width), bool)
  for i, name in enumerate(names):
    raw = str(name).encode()
    table[i, :len(raw)] = np.frombuffer(raw, np.uint8)
    table_mask[i, :len(raw)] = True
  n = len(codes)
  tab = np.full((n, 1), ord('\t'), np.uint8)
  nl = np.full((n, 1), ord('\n'), np.uint8)
  ones = np.ones((n, 1), bool)
  parts = []
  for name in ('user', 'item'):
    d, m = _digits(columns[name])
    parts += [(d, m), (tab, ones)]
  parts += [(table[codes], table_mask[codes]), (tab, ones)]
  parts += [_digits(columns['timestamp']), (nl, ones)]
  chars = np.concatenate([p[0] for p in parts], axis=1)
  mask = np.concatenate([p[1] for p in parts], axis=1)
  return chars[mask].tobytes()


def write_tsv(path: str | os.PathLike, columns: dict[str, np.ndarray],
              chunk: int = 1 << 20) -> pathlib.Path:
  """Writes `columns` (as returned by `generate`) in the reference format, atomically.

  `behavior` may be uint8 codes into `BEHAVIORS` or strings. The file appears complete
  or not at all (temp file in the same directory, then `os.replace`).
  """
  path = pathlib.Path(path)
  with atomic.atomic_write(path) as f:
    n = len(columns['user'])
    for lo in range(0, n, chunk):
      f.write(_encode_lines({c: np.asarray(columns[c])[lo:lo + chunk]
                             for c in ('user', 'item', 'behavior', 'timestamp')}))
  return path


def summarize(columns: dict[str, np.ndarray]) -> dict:
  """Counts for logs: users, items, interactions and per-behavior counts."""
  counts = np.bincount(columns['behavior'].astype(np.int64), minlength=len(BEHAVIORS))
  return dict(users=len(np.unique(columns['user'])),
              items=len(np.unique(columns['item'])),
              interactions=len(columns['user']),
              **{name: int(c) for name, c in zip(BEHAVIORS, counts)})


def preset_knobs(name: str) -> dict:
  """The knobs of a preset (its sizes left out); {} for ''."""
  if not name:
    return {}
  if name not in PRESETS:
    raise ConfigError(f'unknown synthetic preset {name!r}; use one of {sorted(PRESETS)}',
                      field='config.data.synthetic.preset')
  return {k: v for k, v in PRESETS[name].items() if k not in ('num_users', 'num_items')}


def ensure_dataset(path: str | os.PathLike, *, num_users: int, num_items: int,
                   seed: int = 0, **knobs) -> pathlib.Path:
  """Returns `path`, generating and writing the data set first if it does not exist."""
  path = pathlib.Path(path)
  if path.exists():
    return path
  t0 = time.perf_counter()
  cols = generate(num_users, num_items, seed=seed, **knobs)
  write_tsv(path, cols)
  s = summarize(cols)
  print(f'generated synthetic data set {path}: {s["users"]:,} users, {s["items"]:,} '
        f'items, {s["interactions"]:,} interactions (seed {seed}) in '
        f'{time.perf_counter() - t0:.1f} s', file=sys.stderr, flush=True)
  return path


# ------------------------------------------------------------------------ CLI

def _main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  if f.preset:
    size = dict(PRESETS[f.preset])
  elif f.users and f.items:
    size = {}
  else:
    raise ConfigError('give --preset, or both --users and --items')
  if f.users:
    size['num_users'] = f.users
  if f.items:
    size['num_items'] = f.items
  t0 = time.perf_counter()
  cols = generate(seed=f.seed, **size)
  t_gen = time.perf_counter() - t0
  path = write_tsv(f.out, cols)
  t_all = time.perf_counter() - t0
  s = summarize(cols)
  n = s['interactions']
  shares = ', '.join(f'{b} {s[b]:,} ({100 * s[b] / n:.1f}%)' for b in BEHAVIORS)
  print(f'wrote {path}: {s["users"]:,} users, {s["items"]:,} items, {n:,} interactions; '
        f'{shares}; seed {f.seed}; generated in {t_gen:.2f} s, total {t_all:.2f} s')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', None, 'output file (reference TSV format)', required=True)
  flags.DEFINE_enum('preset', None, list(PRESETS), 'size preset')
  flags.DEFINE_integer('users', None, 'number of users (overrides the preset)')
  flags.DEFINE_integer('items', None, 'number of items (overrides the preset)')
  flags.DEFINE_integer('seed', 0, 'random seed')
  from gear_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.main(_main))
