"""files.write_atomically: the old file or the whole new one, never half, local or remote."""

import errno
import gc
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


def test_the_new_contents_are_on_disk_before_the_rename(tmp_path, monkeypatch):
  """A power loss after the rename but before the kernel wrote the data back can leave the
  target empty, the old contents gone: the data is synced first, then the directory (the
  rename). Recorded by inode, since the temporary file has its own name."""
  events = []
  real_fsync, real_replace = os.fsync, os.replace
  def fsync(fd):
    events.append(('fsync', os.fstat(fd).st_ino, os.fstat(fd).st_size))
    real_fsync(fd)
  def replace(src, dst):
    events.append(('replace', os.stat(src).st_ino))
    real_replace(src, dst)
  monkeypatch.setattr(os, 'fsync', fsync)
  monkeypatch.setattr(os, 'replace', replace)
  target = tmp_path / 'results.json'
  files.write_atomically(target, '{"complete": true}')
  [(_, renamed)] = [e for e in events if e[0] == 'replace']
  order = [e[:2] for e in events]
  assert order.index(('fsync', renamed)) < order.index(('replace', renamed))
  assert ('fsync', renamed, len('{"complete": true}')) in events   # all of it, not a buffer short
  assert ('fsync', os.stat(tmp_path).st_ino) in order[order.index(('replace', renamed)):]


@pytest.mark.parametrize('code, raised', [(errno.EINVAL, False), (errno.EIO, True)])
def test_a_filesystem_without_fsync_still_writes_but_an_io_error_fails(
    tmp_path, monkeypatch, code, raised):
  """Some FUSE mounts answer fsync with EINVAL: that is no reason to fail a write. EIO
  means the data may not be on the disk: the old file stays, and the error is raised."""
  def fsync(fd):
    raise OSError(code, os.strerror(code))
  target = tmp_path / 'results.json'
  files.write_atomically(target, 'old')
  monkeypatch.setattr(os, 'fsync', fsync)
  if raised:
    with pytest.raises(OSError):
      files.write_atomically(target, 'new')
  else:
    files.write_atomically(target, 'new')
  assert target.read_text() == ('old' if raised else 'new')
  assert os.listdir(tmp_path) == ['results.json']


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


class _GcsLikeFile(fsspec.spec.AbstractBufferedFile):
  """Like gcsfs's file: the object appears under its name when the final chunk is sent,
  which close() (and so leaving a `with` block, or garbage collection) does."""
  def _initiate_upload(self):
    self._parts = []

  def _upload_chunk(self, final=False):
    self._parts.append(self.buffer.getvalue())
    if final and _GcsLikeFileSystem.fail_final:
      raise OSError('the final chunk was refused')
    if final:
      self.fs.store[self.path] = b''.join(self._parts)
    return True

  def write(self, data):
    _GcsLikeFileSystem.writes += 1
    if _GcsLikeFileSystem.writes == _GcsLikeFileSystem.interrupt_at_write:
      raise KeyboardInterrupt('Ctrl-C during the upload')
    return super().write(data)


class _GcsLikeFileSystem(fsspec.AbstractFileSystem):
  protocol = 'gcslike'
  store = {}
  writes = 0
  interrupt_at_write = None
  fail_final = False

  def _open(self, path, mode='rb', block_size=None, **kwargs):
    return _GcsLikeFile(self, path, mode, block_size=4)


def test_an_upload_interrupted_part_way_publishes_nothing(monkeypatch):
  """An exception or Ctrl-C in the middle of the upload itself (not while staging): the
  object store must not finalise the part sent so far under the final name."""
  fsspec.register_implementation('gcslike', _GcsLikeFileSystem, clobber=True)
  monkeypatch.setattr(_GcsLikeFileSystem, 'store', {})
  monkeypatch.setattr(files, '_UPLOAD_CHUNK_BYTES', 4)   # several writes for a short file
  payload = b'{"format_version": 1, "shards": ["part-00000.npy", "part-00001.npy"]}'
  url = 'gcslike://bucket/c4/train/metadata.json'
  files.write_atomically(url, payload)
  assert _GcsLikeFileSystem.store == {'bucket/c4/train/metadata.json': payload}

  monkeypatch.setattr(_GcsLikeFileSystem, 'writes', 0)
  monkeypatch.setattr(_GcsLikeFileSystem, 'interrupt_at_write', 3)
  with pytest.raises(KeyboardInterrupt):
    files.write_atomically('gcslike://bucket/c4/validation/metadata.json', payload)
  monkeypatch.setattr(_GcsLikeFileSystem, 'writes', 0)
  with pytest.raises(KeyboardInterrupt):   # over an existing object: the old one stays
    files.write_atomically(url, payload[::-1])
  gc.collect()   # a dropped file object closes itself; that must not publish either
  assert _GcsLikeFileSystem.store == {'bucket/c4/train/metadata.json': payload}


def test_a_failed_final_upload_is_raised_not_lost_in_garbage_collection(monkeypatch):
  """The object store publishes on close(): left to the file's __del__, an error there is
  printed and ignored, and a failed upload would look like a success."""
  fsspec.register_implementation('gcslike', _GcsLikeFileSystem, clobber=True)
  monkeypatch.setattr(_GcsLikeFileSystem, 'store', {})
  monkeypatch.setattr(_GcsLikeFileSystem, 'fail_final', True)
  with pytest.raises(OSError, match='final chunk was refused'):
    files.write_atomically('gcslike://bucket/run/config.json', b'{"a": 1}')
  assert not _GcsLikeFileSystem.store


def test_ctrl_c_while_writing_a_local_file_leaves_no_temporary_file(tmp_path):
  (tmp_path / 'config.json').write_text('{"old": true}')
  def interrupted(f):
    f.write(b'{"new"')
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    files.write_atomically(tmp_path / 'config.json', interrupted)
  assert os.listdir(tmp_path) == ['config.json']
  assert (tmp_path / 'config.json').read_text() == '{"old": true}'


def test_an_upload_to_a_filesystem_that_writes_in_place_fails_part_way_publishing_nothing(
    monkeypatch):
  """memory:// (like sftp, HDFS) creates the file at open and writes into it: a copy that
  fails half-way left the half under the final name, over the good one."""
  fs = fsspec.filesystem('memory')
  url = 'memory://bucket/in_place/metrics.json'
  files.write_atomically(url, '{"complete": true}')
  def half_then_killed(source, target, length=0):
    del length
    target.write(source.read(5))
    raise KeyboardInterrupt
  monkeypatch.setattr(files.shutil, 'copyfileobj', half_then_killed)
  for target in (url, 'memory://bucket/in_place/new.json'):
    with pytest.raises(KeyboardInterrupt):
      files.write_atomically(target, '{"complete": false, "padding": 1}')
  gc.collect()
  assert fs.cat('/bucket/in_place/metrics.json') == b'{"complete": true}'
  assert fs.ls('/bucket/in_place', detail=False) == ['/bucket/in_place/metrics.json']


def test_every_cache_follows_bert_sym_cache_then_xdg_cache_home(tmp_path, monkeypatch):
  """The vocabulary, the trainer's compiled steps and GLUE's token ids live under one
  root that the user (and the tests, conftest.py) can move: the configs' defaults went to
  ~/.cache whatever the environment said. The configs keep the symbolic default, so that a
  run's config.json is the same on every machine (a resume compares it, from_json reruns
  it)."""
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from bert_sym import loop  # pylint: disable=import-outside-toplevel
  from bert_sym.input import tokenizer  # pylint: disable=import-outside-toplevel
  train = importlib.import_module('configs.tiny').get_config()
  glue = importlib.import_module('configs.glue').get_config()
  assert (train.compilation_cache_dir, glue.tokens_cache_dir) == (
      '~/.cache/bert_sym/jax', '~/.cache/bert_sym/glue_tokens')
  settings = {}   # (not this test process's own compilation cache)
  monkeypatch.setattr(jax.config, 'update', lambda name, value: settings.update({name: value}))

  def caches():
    tokenizer.default_vocab_file.cache_clear()
    loop.enable_compilation_cache(train.compilation_cache_dir)
    return (settings['jax_compilation_cache_dir'],
            tokenizer.WordPiece(cache_dir=glue.tokens_cache_dir).cache_dir,
            os.path.dirname(tokenizer.default_vocab_file()))
  try:
    monkeypatch.delenv('BERT_SYM_CACHE', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    root = tmp_path / 'xdg' / 'bert_sym'
    assert caches() == (str(root / 'jax'), str(root / 'glue_tokens'), str(root))
    monkeypatch.setenv('BERT_SYM_CACHE', str(tmp_path / 'own'))
    root = tmp_path / 'own'
    assert caches() == (str(root / 'jax'), str(root / 'glue_tokens'), str(root))
    # Any other directory is the user's choice, as given.
    assert files.cache_dir('~/elsewhere/jax') == os.path.expanduser('~/elsewhere/jax')
    assert files.cache_dir('~/.cache/bert_sym//jax') == str(root / 'jax')   # not /jax
  finally:
    tokenizer.default_vocab_file.cache_clear()


def test_the_test_session_keeps_its_caches_out_of_the_users_home():
  assert not os.environ['BERT_SYM_CACHE'].startswith(os.path.expanduser('~/.cache'))


def test_a_bucket_this_machine_cannot_write_is_one_line_not_a_traceback(tmp_path, monkeypatch):
  """TensorFlow's gfile (etils.epath's gs:// backend once TF is imported: the trainer's
  --workdir, aot's --out) raises tf.errors.OpError, not OSError: a bucket the TPU VM's
  service account cannot write was a traceback at start-up."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  denied = tf.errors.PermissionDeniedError(
      None, None, 'Error executing an HTTP request: HTTP response code 403\n when initiating '
      'an upload to gs://bucket/run/.write-probe')
  monkeypatch.setattr(type(epath.Path(tmp_path)), 'mkdir', lambda *a, **k: _raise(denied))
  with pytest.raises(ValueError) as raised:
    files.check_writable(tmp_path / 'run', '--workdir=gs://bucket/run')
  assert str(raised.value) == (
      'Cannot write to --workdir=gs://bucket/run: PermissionDeniedError: Error executing an '
      'HTTP request: HTTP response code 403 when initiating an upload to '
      'gs://bucket/run/.write-probe. Fix: check that this machine can reach and write it '
      '(network, credentials, bucket permissions), or pass another directory.')
  monkeypatch.setattr(type(epath.Path(tmp_path)), 'mkdir',
                      lambda *a, **k: _raise(KeyError('a bug')))
  with pytest.raises(KeyError):   # anything else is still a bug, raised as it is
    files.check_writable(tmp_path / 'run', '--workdir=gs://bucket/run')


def test_a_url_tensorflows_file_system_lacks_is_named_as_such_not_a_network_problem():
  """s3:// and az:// go through TensorFlow's gfile once TF is installed (etils.epath), which
  has neither: its UnimplementedError was worded as 'check the network, credentials'."""
  with pytest.raises(ValueError) as raised:
    files.check_writable('s3://bucket/glue', '--output_dir=s3://bucket/glue')
  assert str(raised.value).startswith(
      "Cannot write to --output_dir=s3://bucket/glue: File system scheme 's3' not implemented")
  assert str(raised.value).endswith('Fix: a local directory or gs://bucket/path.')


def _raise(error):
  raise error
