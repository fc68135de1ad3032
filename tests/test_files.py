"""files.write_atomically: the old file or the whole new one, never half, local or remote."""

import os

import fsspec
import pytest

from bert_sym import files


def test_writes_bytes_text_and_writer_functions(tmp_path):
  target = tmp_path / 'deep' / 'dir' / 'out.bin'
  files.write_atomically(target, b'\x00\x01')
  assert target.read_bytes() == b'\x00\x01'
  files.write_atomically(str(target), 'é')
  assert target.read_bytes() == 'é'.encode('utf-8')
  files.write_atomically(f'file://{target}', lambda f: f.write(b'abc'))
  assert target.read_bytes() == b'abc'


def _crash_mid_write(f):
  f.write(b'{"compl')
  raise RuntimeError('killed mid-write')


def test_a_crash_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / 'results.json'
  files.write_atomically(target, '{"complete": true}')
  with pytest.raises(RuntimeError, match='killed'):
    files.write_atomically(target, _crash_mid_write)
  assert target.read_text() == '{"complete": true}'
  assert os.listdir(tmp_path) == ['results.json']


def test_object_store_paths_go_through_fsspec():
  url = 'memory://bucket/run/metadata.json'
  files.write_atomically(url, '{"n": 1}')
  with fsspec.open(url, 'rb') as f:
    assert f.read() == b'{"n": 1}'


def test_a_crash_mid_write_to_an_object_store_publishes_nothing():
  """fsspec's file object publishes what was written when its `with` block is left, even
  on an exception: a half results file that looks complete. Staged locally instead."""
  url = 'memory://bucket/run/glue_results.json'
  files.write_atomically(url, '{"complete": true}')
  with pytest.raises(RuntimeError, match='killed'):
    files.write_atomically(url, _crash_mid_write)
  with fsspec.open(url, 'rb') as f:
    assert f.read() == b'{"complete": true}'
  with pytest.raises(RuntimeError, match='killed'):
    files.write_atomically('memory://bucket/run/new.json', _crash_mid_write)
  assert not fsspec.filesystem('memory').exists('/bucket/run/new.json')
