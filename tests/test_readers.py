"""Raw readers: each format, gzip input, and each kind of bad input named by file, line
and field."""

import gzip

import numpy as np
import pytest

from gear_jax.data import readers
from gear_jax.data.errors import DataError

BEHAVIORS = ('pv', 'fav', 'cart', 'buy')


def test_tsv_reference_format(write):
  path = write('r.txt', '1\t10\tpv\t100\n1\t11\tbuy\t105\n2\t10\tcart\t90\n')
  r = readers.read_interactions(path, readers.TSV, BEHAVIORS)
  assert r.user.tolist() == [1, 1, 2]
  assert r.item.tolist() == [10, 11, 10]
  assert r.behavior.tolist() == [1, 4, 3]
  assert r.timestamp.tolist() == [100, 105, 90]
  assert r.user.dtype == np.int64 and r.timestamp.dtype == np.int64


def test_tsv_crlf_blank_lines_and_no_final_newline(write):
  path = write('r.txt', b'1\t10\tpv\t100\r\n\r\n\n2\t11\tbuy\t7')
  r = readers.read_interactions(path, readers.TSV, BEHAVIORS)
  assert r.user.tolist() == [1, 2] and r.timestamp.tolist() == [100, 7]
  assert r.behavior.tolist() == [1, 4]


def test_string_ids_are_kept_as_strings(write):
  # '007' and '7' are different raw ids: a leading zero makes ids strings
  path = write('r.txt', 'alice\t007\tpv\t1\nbob\t7\tfav\t2\n')
  r = readers.read_interactions(path, readers.TSV, BEHAVIORS)
  assert r.user.dtype.kind == 'S' and r.item.dtype.kind == 'S'
  assert r.user.tolist() == [b'alice', b'bob'] and r.item.tolist() == [b'007', b'7']


def test_taobao_format(write):
  path = write('UserBehavior.csv', '1,2268318,2520377,pv,1511544070\n'
                                   '1,2333346,2520771,buy,1511561733\n')
  r = readers.read_interactions(path, readers.TAOBAO, BEHAVIORS)
  assert r.user.tolist() == [1, 1]
  assert r.item.tolist() == [2268318, 2333346]  # the category column is skipped
  assert r.behavior.tolist() == [1, 4]
  assert r.timestamp.tolist() == [1511544070, 1511561733]


def test_generic_csv_retailrocket(write):
  text = ('timestamp,visitorid,event,itemid,transactionid\n'
          '1433221332117,257597,view,355908,\n'
          '1433224214164,992329,addtocart,248676,\n'
          '1433221999827,111016,transaction,3,4000\n')
  path = write('events.csv', text)
  fmt = readers.FileFormat(
      ',', True, dict(user='visitorid', item='itemid', behavior='event',
                      timestamp='timestamp'),
      behavior_map=readers.parse_behavior_map('view:pv,addtocart:cart,transaction:buy'),
      timestamp_divisor=1000)
  r = readers.read_interactions(path, fmt, BEHAVIORS)
  assert r.user.tolist() == [257597, 992329, 111016]
  assert r.item.tolist() == [355908, 248676, 3]
  assert r.behavior.tolist() == [1, 3, 4]
  assert r.timestamp.tolist() == [1433221332, 1433224214, 1433221999]  # ms -> s


def test_generic_csv_by_position_without_header(write):
  path = write('x.tsv', '5;9;x;click\n6;9;y;purchase\n')
  fmt = readers.FileFormat(';', False, dict(user=0, item=1, behavior=3, timestamp=0),
                           behavior_map={'click': 'pv', 'purchase': 'buy'})
  r = readers.read_interactions(path, fmt, BEHAVIORS)
  assert r.behavior.tolist() == [1, 4] and r.timestamp.tolist() == [5, 6]


def test_blocks_keep_line_numbers(write, monkeypatch):
  monkeypatch.setattr(readers, '_BLOCK_BYTES', 64)  # many blocks, lines split across
  lines = [f'{u}\t{u + 100}\tpv\t{1000 + u}' for u in range(200)]
  lines[157] = '157\t257\tpv\tsoon'
  path = write('r.txt', '\n'.join(lines) + '\n')
  with pytest.raises(DataError) as e:
    readers.read_interactions(path, readers.TSV, BEHAVIORS)
  assert e.value.line == 158 and e.value.field == 'timestamp'
  lines[157] = '157\t257\tpv\t1157'
  path = write('ok.txt', '\n'.join(lines) + '\n')
  r = readers.read_interactions(path, readers.TSV, BEHAVIORS)
  assert len(r) == 200 and r.timestamp[-1] == 1199 and r.user.tolist() == list(range(200))


# -- gzip-compressed input ---------------------------------------------------------------

def _lines(n: int) -> list[str]:
  beh = ('pv', 'fav', 'cart', 'buy')
  return [f'{u % 37}\t{(u * 7) % 101}\t{beh[u % 4]}\t{1000 + u}' for u in range(n)]


@pytest.mark.parametrize('block_bytes', [64, 1 << 20])
def test_gzip_file_reads_like_the_plain_file(write, monkeypatch, block_bytes):
  monkeypatch.setattr(readers, '_BLOCK_BYTES', block_bytes)  # 64: lines split across
  lines = _lines(300)
  lines[5] = 'u007\titem-9\tcart\t42'  # string ids
  # CRLF lines, a blank line, no final newline
  text = ('\r\n'.join(lines[:100]) + '\r\n\n' + '\n'.join(lines[100:])).encode()
  plain = readers.read_interactions(write('r.txt', text), readers.TSV, BEHAVIORS)
  path = write('r.txt.gz', gzip.compress(text))
  packed = readers.read_interactions(path, readers.TSV, BEHAVIORS)
  assert len(packed) == len(plain) == 300 and packed.path == path
  for name in ('user', 'item', 'behavior', 'timestamp'):
    a, b = getattr(plain, name), getattr(packed, name)
    assert a.dtype == b.dtype and np.array_equal(a, b), name
  assert packed.behaviors == plain.behaviors


def test_gzip_file_errors_name_the_gz_file_and_line(write, monkeypatch):
  monkeypatch.setattr(readers, '_BLOCK_BYTES', 64)
  lines = _lines(200)
  lines[157] = '157\t257\tpv\tsoon'
  path = write('r.txt.gz', gzip.compress(('\n'.join(lines) + '\n').encode()))
  e = _error(path)
  assert (e.path, e.line, e.field) == (path, 158, 'timestamp')
  assert 'r.txt.gz:158' in str(e) and "'soon'" in str(e)
  lines[157] = '157\t257\tpv\t1157'
  lines[190] = '190\t290\tpv'
  e = _error(write('s.txt.gz', gzip.compress(('\n'.join(lines) + '\n').encode())))
  assert e.line == 191 and 's.txt.gz:191' in str(e) and 'found 3' in str(e)


def test_damaged_gzip_file_is_a_data_error(write):
  e = _error(write('plain.txt.gz', '1\t10\tpv\t100\n'))  # not compressed at all
  assert 'plain.txt.gz' in str(e) and 'decompress' in str(e) and 'gzip' in str(e)
  whole = gzip.compress(('\n'.join(_lines(50)) + '\n').encode())
  e = _error(write('cut.txt.gz', whole[:len(whole) // 2]))  # truncated
  assert 'cut.txt.gz' in str(e) and 'decompress' in str(e)


# -- bad input -------------------------------------------------------------------------

def _error(path, fmt=readers.TSV, behaviors=BEHAVIORS) -> DataError:
  with pytest.raises(DataError) as e:
    readers.read_interactions(path, fmt, behaviors)
  return e.value


def test_wrong_column_count_names_the_line(write):
  e = _error(write('r.txt', '1\t10\tpv\t100\n1\t11\tbuy\n2\t10\tcart\t90\n'))
  assert e.line == 2 and 'r.txt:2' in str(e)
  assert 'expected 4 fields' in str(e) and 'found 3' in str(e)


def test_non_numeric_timestamp_names_line_and_field(write):
  e = _error(write('r.txt', '1\t10\tpv\t100\n1\t11\tbuy\t12:30\n'))
  assert (e.line, e.field) == (2, 'timestamp')
  assert "'12:30'" in str(e) and 'not a non-negative integer' in str(e)


def test_header_in_a_headerless_format_is_explained(write):
  e = _error(write('r.txt', 'user\titem\tbehavior\ttimestamp\n1\t10\tpv\t100\n'))
  assert e.line == 1 and e.field == 'timestamp' and 'header' in str(e)


def test_empty_file(write):
  e = _error(write('r.txt', ''))
  assert 'empty' in str(e) and 'r.txt' in str(e)
  e = _error(write('h.csv', 'a,b,c,d\n'), readers.FileFormat(
      ',', True, dict(user='a', item='b', behavior='c', timestamp='d')))
  assert 'empty' in str(e)


def test_unknown_behavior_names_the_line(write):
  e = _error(write('r.txt', '1\t10\tpv\t100\n1\t11\tclick\t101\n'))
  assert (e.line, e.field) == (2, 'behavior')
  assert "'click'" in str(e) and 'data.behaviors' in str(e)


def test_missing_file_and_directory(tmp_path):
  e = _error(str(tmp_path / 'nope.txt'))
  assert 'not found' in str(e) and 'data.path' in str(e) and 'demo' in str(e)
  e = _error(str(tmp_path))
  assert 'directory' in str(e)


def test_missing_header_column(write):
  fmt = readers.FileFormat(',', True, dict(user='visitor', item='itemid',
                                           behavior='event', timestamp='timestamp'))
  e = _error(write('events.csv', 'timestamp,visitorid,event,itemid\n1,2,view,3\n'), fmt,
             ('view',))
  assert e.line == 1 and "'visitor'" in str(e) and 'visitorid' in str(e)


def test_empty_id(write):
  e = _error(write('r.txt', '1\t10\tpv\t100\n\t11\tbuy\t101\n'))
  assert (e.line, e.field) == (2, 'user')


def test_bad_behavior_map():
  with pytest.raises(DataError, match='behavior_map'):
    readers.parse_behavior_map('view=pv')
