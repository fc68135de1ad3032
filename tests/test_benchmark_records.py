"""The CPU benchmarks' records: what `--record` writes into benchmarks/RESULTS.md."""

import argparse
import os
import sys

import pytest

from tests.train_fixtures import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))
import data_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_recorded_input_pipeline_run_goes_under_the_one_heading(tmp_path, monkeypatch):
  """It was appended to RESULTS.md with its own '## Input pipeline': a second section."""
  results = tmp_path / 'benchmarks' / 'RESULTS.md'
  results.parent.mkdir()
  results.write_text('# Results\n\n## Input pipeline\n\npreface\n\n### Older\n\nolder record\n\n'
                     '## Next\n\nkept\n')
  monkeypatch.setattr(data_pipeline, 'RESULTS', results)
  rows = [(f'path {i}', 300_000.0 + i, 1) for i in range(5)]
  args = argparse.Namespace(record=True, out_dir=str(tmp_path / 'out'), max_seq_len=512,
                            batch_size=32, steps=200)
  for _ in range(2):
    data_pipeline.write(args, rows, examples=1027, cores=2)
  text = results.read_text()
  assert text.count('## Input pipeline') == 1 and text.count('### Recorded ') == 2
  assert (text.index('preface') < text.index('### Recorded ') < text.index('### Older')
          < text.index('## Next'))
  assert text.endswith('## Next\n\nkept\n') and '| path 4 | 300,004 | 1 |' in text


@pytest.mark.parametrize('bad', ['--rounds=0', '--seeds=0', '--steps=0'])
def test_glue_seeds_refuses_a_count_of_zero_before_it_runs(bad, monkeypatch, capsys):
  """--rounds=0 ran every seed (compiles included), then raised StatisticsError (the median
  of no rounds) and wrote nothing."""
  import glue_seeds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'argv', ['glue_seeds.py', bad])
  with pytest.raises(SystemExit):
    glue_seeds.parse_args()
  assert 'must be at least 1' in capsys.readouterr().err


@pytest.mark.parametrize('bad', ['--rounds=0', '--steps=0', '--batch=0', '--seq_len=0'])
def test_attention_variants_refuses_a_count_of_zero_before_it_runs(bad, monkeypatch, capsys):
  """--rounds=0 compiled every variant, then failed in the summary (the median of nothing)."""
  import attention_variants  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'argv', ['attention_variants.py', bad])
  with pytest.raises(SystemExit):
    attention_variants.parse_args()
  assert 'must be at least 1' in capsys.readouterr().err
