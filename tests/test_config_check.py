"""bert_sym.config_check.preflight: what a run needs, checked before anything is written."""

import json
import os

import pytest

from bert_sym import config_check
from configs import common
from configs import from_json


def test_config_json_holds_absolute_data_paths_and_reruns_from_any_directory(
    tmp_path, monkeypatch):
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'a.txt').write_text('some text\n')
  monkeypatch.chdir(tmp_path)
  config = common.base_config('tiny')
  config.data.update(dict(vocab_path='data/vocab.txt', text_files='data/*.txt, data/a.txt',
                          validation_files='', shards_dir='gs://bucket/c4_512'))
  resolved = config_check.absolute_data_paths(config)
  assert resolved.data.vocab_path == str(tmp_path / 'data' / 'vocab.txt')
  assert resolved.data.text_files == f'{tmp_path}/data/*.txt,{tmp_path}/data/a.txt'
  assert resolved.data.shards_dir == 'gs://bucket/c4_512'   # URLs stay as they are
  assert config.data.vocab_path == 'data/vocab.txt'         # the caller's config untouched
  # What the trainer writes as config.json, read back from another directory.
  (tmp_path / 'config.json').write_text(resolved.to_json())
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  rerun = from_json.get_config(str(tmp_path / 'config.json'))
  assert os.path.exists(rerun.data.text_files.split(',')[1])
  assert json.loads(rerun.to_json()) == json.loads(resolved.to_json())


def test_memory_mapped_shards_from_a_url_name_the_streaming_source():
  """source='shards' memory-maps files: from gs:// it used to fail later, on a mangled
  local path ('gs:/bucket/...'), instead of naming the source that reads URLs."""
  config = common.base_config('tiny')
  config.data.update(dict(source='shards', shards_dir='gs://bucket/c4_512'))
  with pytest.raises(config_check.ConfigError, match='--config.data.source=streaming'):
    config_check.check(config)
  config.data.source = 'streaming'
  config_check.check(config)
