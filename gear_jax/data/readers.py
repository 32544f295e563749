"""Raw interaction readers: a delimited text file -> columns (user, item, behavior, time).

Parsing is vectorised over a block of lines at a time (numpy on the raw bytes), so a
file of millions of lines is read in about a second with bounded memory. Every problem
is reported as a `DataError` naming the file, the 1-based line number, the field and
the offending text.

Formats (``config.data.format``):
- ``tsv``: the reference format, ``user<TAB>item<TAB>behavior<TAB>timestamp``, no header.
- ``taobao``: Taobao UserBehavior, ``user,item,category,behavior,timestamp``, no header.
- ``csv``: any delimited file; columns by header name or 0-based position, optional
  header, a behavior-name mapping and the timestamp unit (see `FileFormat`).
Quoted fields are not supported (none of the published files uses quoting).

A path ending in ``.gz`` is gzip-compressed and decompressed while it is read, block by
block (never whole in memory); line numbers in errors count decompressed lines.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from gear_jax.data.errors import DataError

ROLES = ('user', 'item', 'behavior', 'timestamp')
_BLOCK_BYTES = 32 << 20  # lines are parsed in blocks of about this size
_MAX_INT_DIGITS = 18  # int64 holds every 18-digit number


@dataclasses.dataclass(frozen=True)
class FileFormat:
  """How to read one delimited file.

  Attributes:
    delimiter: one character separating fields.
    header: whether the first line names the columns (and is skipped).
    columns: role -> 0-based position or header name, for the roles in `ROLES`.
    num_fields: the number of fields every line must have; None = from the header,
      or from the first data line when there is no header.
    behavior_map: raw behavior value -> behavior name used in the config (e.g.
      ``{'view': 'pv'}``); values absent from the map are used as they are.
    timestamp_divisor: raw timestamps are divided by this (1000 for milliseconds)
      so that times are seconds.
  """
  delimiter: str
  header: bool
  columns: Mapping[str, int | str]
  num_fields: int | None = None
  behavior_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
  timestamp_divisor: int = 1

  def describe(self) -> dict:
    """JSON-able description (part of the preprocessing cache key)."""
    return dict(delimiter=self.delimiter, header=self.header,
                columns=dict(self.columns), num_fields=self.num_fields,
                behavior_map=dict(sorted(self.behavior_map.items())),
                timestamp_divisor=self.timestamp_divisor)


TSV = FileFormat('\t', False, dict(user=0, item=1, behavior=2, timestamp=3), 4)
TAOBAO = FileFormat(',', False, dict(user=0, item=1, behavior=3, timestamp=4), 5)


def parse_behavior_map(text: str) -> dict[str, str]:
  """Parses ``'view:pv,addtocart:cart'`` into a dict (the config stores a string)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(','))):
    raw, sep, name = part.partition(':')
    if not sep or not raw or not name:
      raise DataError(f'bad behavior_map entry {part!r}; expected raw:name pairs '
                      "separated by commas, e.g. 'view:pv,addtocart:cart'",
                      field='data.csv.behavior_map')
    out[raw.strip()] = name.strip()
  return out


@dataclasses.dataclass
class RawInteractions:
  """Parsed columns, one row per interaction, in file order.

  `user` and `item` are int64 when every id in the file is a plain decimal number,
  otherwise fixed-width byte strings. `behavior` holds 1-based indices into
  `behaviors` (the configured names). `timestamp` is int64 seconds.
  """
  user: np.ndarray
  item: np.ndarray
  behavior: np.ndarray
  timestamp: np.ndarray
  behaviors: tuple[str, ...]
  path: str

  def __len__(self) -> int:
    return len(self.timestamp)


def read_interactions(path: str | os.PathLike, fmt: FileFormat,
                      behaviors: Sequence[str]) -> RawInteractions:
  """Reads `path` in format `fmt`; behavior values must map into `behaviors`.

  A `path` ending in ``.gz`` is read through gzip, streamed block by block.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError('file not found', path=path, field='data.path',
                    hint='set --config.data.path to a raw interaction file, or try '
                    'configs/demo.py, which generates its own synthetic data')
  if os.path.isdir(path):
    raise DataError('is a directory, expected a file', path=path, field='data.path')
  if len(fmt.delimiter.encode()) != 1:
    raise DataError(f'delimiter must be one byte, got {fmt.delimiter!r}',
                    field='data.csv.delimiter')
  behaviors = tuple(behaviors)
  parser = _BlockParser(path, fmt, behaviors)
  parts = []
  compressed = path.lower().endswith('.gz')
  with (gzip.open(path, 'rb') if compressed else open(path, 'rb')) as f:
    carry = b''
    line_no = 1
    while True:
      chunk = _read_block(f, path, line_no) if compressed else f.read(_BLOCK_BYTES)
      data = carry + chunk
      if not chunk:
        if data and not data.endswith(b'\n'):
          data += b'\n'
        carry = b''
      else:
        cut = data.rfind(b'\n') + 1
        data, carry = data[:cut], data[cut:]
      if data:
        parsed, n_lines = parser.parse(np.frombuffer(data, np.uint8), line_no)
        if parsed is not None:
          parts.append(parsed)
        line_no += n_lines
      if not chunk:
        break
  if not parts:
    raise DataError('no interactions: the file is empty (or holds only a header)',
                    path=path, hint='check data.path and data.format')
  cols = {}
  for role in ('user', 'item'):
    blocks = [p[role] for p in parts]
    if any(b.dtype.kind == 'S' for b in blocks):  # one non-numeric id: all strings
      blocks = [b if b.dtype.kind == 'S' else b.astype('S20') for b in blocks]
      width = max(b.dtype.itemsize for b in blocks)
      blocks = [b.astype(f'S{width}') for b in blocks]
    cols[role] = np.concatenate(blocks)
  return RawInteractions(
      user=cols['user'], item=cols['item'],
      behavior=np.concatenate([p['behavior'] for p in parts]),
      timestamp=np.concatenate([p['timestamp'] for p in parts]),
      behaviors=behaviors, path=path)


def _read_block(f, path: str, line_no: int) -> bytes:
  """The next block of decompressed bytes; a damaged .gz file is a DataError."""
  try:
    return f.read(_BLOCK_BYTES)
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    where = f' after line {line_no - 1}' if line_no > 1 else ''
    raise DataError(f'cannot decompress{where}: {e}', path=path, field='data.path',
                    hint='the file ends in .gz but is not a complete gzip file; '
                    'check it with gzip -t, or give the uncompressed file') from None


class _BlockParser:
  """Parses blocks of complete lines; remembers the header and the field count."""

  def __init__(self, path: str, fmt: FileFormat, behaviors: tuple[str, ...]):
    self.path, self.fmt, self.behaviors = path, fmt, behaviors
    self.delim = fmt.delimiter.encode()[0]
    self.num_fields = fmt.num_fields
    self.positions: dict[str, int] | None = None
    self.header_pending = fmt.header
    self.behavior_lookup = {name: i + 1 for i, name in enumerate(behaviors)}

  def _error(self, msg, line, field=None, hint=None):
    return DataError(msg, path=self.path, line=int(line), field=field, hint=hint)

  def _resolve_columns(self, header: list[str] | None, line: int) -> None:
    positions = {}
    for role in ROLES:
      spec = self.fmt.columns.get(role)
      if spec is None:
        raise DataError(f'no column configured for {role!r}',
                        field=f'data.csv.columns.{role}')
      if isinstance(spec, str) and not spec.lstrip('-').isdigit():
        if header is None:
          raise DataError(f'column {role!r} is given by name ({spec!r}) but the file '
                          'has no header', path=self.path,
                          field=f'data.csv.columns.{role}',
                          hint='give a 0-based position, or set data.csv.header=True')
        if spec not in header:
          raise self._error(f'header has no column {spec!r} (for {role}); columns are '
                            f'{header}', line, field=f'data.csv.columns.{role}')
        positions[role] = header.index(spec)
      else:
        positions[role] = int(spec)
      if not 0 <= positions[role] < self.num_fields:
        raise self._error(f'column {positions[role]} for {role!r} does not exist; '
                          f'lines have {self.num_fields} fields', line,
                          field=f'data.csv.columns.{role}')
    self.positions = positions

  def _line_text(self, buf, s, e) -> str:
    text = bytes(buf[s:min(e, s + 160)]).decode('utf-8', 'replace')
    return text + ('...' if e - s > 160 else '')

  @staticmethod
  def _shown(buf, s, e, limit: int = 80) -> str:
    """Raw bytes of an input line for an error message: quoted, cut to `limit`
    bytes, undecodable bytes and control characters escaped (never sent raw to a
    terminal)."""
    text = bytes(buf[s:min(e, s + limit)]).decode('utf-8', 'backslashreplace')
    text = ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"'{text}'" + ('...' if e - s > limit else '')

  def parse(self, buf: np.ndarray, first_line: int):
    """Returns (columns or None, number of lines in `buf`).

    Phases: line bounds, the header (once per file), field bounds and their count,
    then ids, timestamps and behaviors (the first bad value raises a `DataError`)."""
    starts, ends, line_nos = _line_bounds(buf, first_line)
    n_lines = len(line_nos)
    keep = ends > starts  # blank lines are skipped
    if self.header_pending and keep.any():
      h = int(np.argmax(keep))
      self._read_header(buf, starts[h], ends[h], line_nos[h])
      keep[h] = False
    if not keep.any():
      return None, n_lines
    starts, ends, line_nos = starts[keep], ends[keep], line_nos[keep]
    delims, first_d = self._split_fields(buf, starts, ends, line_nos)
    out = {}
    for role in ('user', 'item'):
      fs, fe = self._field(role, starts, ends, delims, first_d)
      out[role] = self._ids(buf, fs, fe, line_nos, role)
    fs, fe = self._field('timestamp', starts, ends, delims, first_d)
    out['timestamp'] = self._timestamps(buf, fs, fe, line_nos)
    fs, fe = self._field('behavior', starts, ends, delims, first_d)
    out['behavior'] = self._behaviors(buf, fs, fe, line_nos)
    return out, n_lines

  def _read_header(self, buf, s, e, line) -> None:
    """Reads the header line buf[s:e]: the field count and the columns by name."""
    header = self._line_text(buf, s, e).split(self.fmt.delimiter)
    header = [c.strip() for c in header]
    if self.num_fields is None:
      self.num_fields = len(header)
    elif len(header) != self.num_fields:
      raise self._error(f'header has {len(header)} fields, expected '
                        f'{self.num_fields}', line)
    self._resolve_columns(header, line)
    self.header_pending = False

  def _split_fields(self, buf, starts, ends, line_nos):
    """(positions of every delimiter in `buf`, index of each line's first one); checks
    that every line has `num_fields` fields (the first data line sets it if unset)."""
    delims = np.flatnonzero(buf == self.delim)
    first_d = np.searchsorted(delims, starts)
    counts = np.searchsorted(delims, ends) - first_d
    if self.num_fields is None:
      self.num_fields = int(counts[0]) + 1
    if self.positions is None:
      self._resolve_columns(None, line_nos[0])
    bad = np.flatnonzero(counts != self.num_fields - 1)
    if len(bad):
      i = bad[0]
      name = {9: 'TAB', 44: 'comma'}.get(self.delim, repr(chr(self.delim)))
      raise self._error(
          f'expected {self.num_fields} fields separated by {name}, found '
          f'{counts[i] + 1}: {self._shown(buf, starts[i], ends[i])}',
          line_nos[i], hint='check data.format (tsv: user item behavior timestamp; '
          'taobao: user,item,category,behavior,timestamp; csv: see data.csv)')
    return delims, first_d

  def _field(self, role, starts, ends, delims, first_d):
    """(starts, ends) of the field of `role` in every line."""
    k = self.positions[role]
    fs = starts if k == 0 else delims[first_d + k - 1] + 1
    fe = ends if k == self.num_fields - 1 else delims[first_d + k]
    return fs, fe

  def _ids(self, buf, fs, fe, line_nos, role) -> np.ndarray:
    """User or item ids: int64 when all are plain decimal numbers, else byte strings."""
    empty = np.flatnonzero(fe <= fs)
    if len(empty):
      raise self._error('empty id', line_nos[empty[0]], field=role)
    values, ok = _parse_uint(buf, fs, fe)
    return values if ok.all() else _as_bytes(buf, fs, fe)

  def _timestamps(self, buf, fs, fe, line_nos) -> np.ndarray:
    """Timestamps in seconds (int64, raw values divided by `timestamp_divisor`)."""
    ts, ok = _parse_uint(buf, fs, fe, allow_leading_zero=True)
    if not ok.all():
      i = np.flatnonzero(~ok)[0]
      raise self._error(
          f'timestamp {self._shown(buf, fs[i], fe[i])} is not a non-negative '
          'integer', line_nos[i], field='timestamp',
          hint='timestamps must be integers (seconds, or milliseconds with '
          'data.csv.timestamp_unit=ms); if the file has a header use '
          'data.format=csv with data.csv.header=True')
    return ts // self.fmt.timestamp_divisor

  def _behaviors(self, buf, fs, fe, line_nos) -> np.ndarray:
    """1-based codes into the configured behaviors (after `behavior_map`), int8."""
    raw = _as_bytes(buf, fs, fe)
    uniq, inverse = np.unique(raw, return_inverse=True)
    codes = np.zeros(len(uniq), np.int8)
    for j, value in enumerate(uniq):
      text = value.decode('utf-8', 'replace').strip()
      name = self.fmt.behavior_map.get(text, text)
      code = self.behavior_lookup.get(name)
      if code is None:
        i = np.flatnonzero(inverse == j)[0]
        raise self._error(
            f'behavior {text!r} is not one of the configured behaviors '
            f'{list(self.behaviors)}', line_nos[i], field='behavior',
            hint='add it to data.behaviors (or map it with data.csv.behavior_map)')
      codes[j] = code
    return codes[inverse.reshape(-1)]


def _line_bounds(buf: np.ndarray, first_line: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(starts, ends, 1-based line numbers) of the lines of `buf`, which ends in a
  newline; an end excludes the newline and a carriage return before it."""
  nl = np.flatnonzero(buf == 10)
  n_lines = len(nl)
  starts = np.empty(n_lines, np.int64)
  starts[0] = 0
  starts[1:] = nl[:-1] + 1
  ends = nl.astype(np.int64)
  cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)
  ends -= cr
  line_nos = first_line + np.arange(n_lines)
  return starts, ends, line_nos


def _parse_uint(buf: np.ndarray, fs: np.ndarray, fe: np.ndarray,
                allow_leading_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Parses decimal digit fields buf[fs:fe] -> (int64 values, ok mask).

  Not ok: empty, a non-digit, more than 18 digits, or (unless allowed) a leading
  zero: ids '007' and '7' must stay distinct, so such ids are read as strings.
  """
  width = fe - fs
  ok = (width > 0) & (width <= _MAX_INT_DIGITS)
  wmax = int(min(width.max(initial=0), _MAX_INT_DIGITS))
  values = np.zeros(len(fs), np.int64)
  for k in range(wmax):  # column k of the right-aligned digit matrix
    pos = fe - wmax + k
    inside = pos >= fs
    digit = buf[np.where(inside, pos, 0)].astype(np.int64) - 48
    ok &= ~inside | ((digit >= 0) & (digit <= 9))
    values = np.where(inside, values * 10 + digit, values)
  if not allow_leading_zero:
    ok &= ~((width > 1) & (buf[fs] == 48))
  return values, ok


def _as_bytes(buf: np.ndarray, fs: np.ndarray, fe: np.ndarray) -> np.ndarray:
  """Fields buf[fs:fe] as a fixed-width byte-string array (left aligned)."""
  wmax = max(int((fe - fs).max(initial=1)), 1)
  chars = np.zeros((len(fs), wmax), np.uint8)
  last = len(buf) - 1
  for k in range(wmax):  # one column of characters at a time: no [n, w] index matrix
    pos = fs + k
    chars[:, k] = np.where(pos < fe, buf[np.minimum(pos, last)], 0)
  return chars.view(f'S{wmax}').reshape(-1)
