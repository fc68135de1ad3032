"""configs/replication.py: the seqio route and the shard route evaluate on the same text, and
an eval never reads a validation block twice."""

import json
import pathlib
import types

import numpy as np
import pytest
import scipy.stats

from bert_sym import shards as export_cli
from bert_sym import train
from bert_sym.input import DataError
from bert_sym.input import iterator as data_lib
from bert_sym.input import seqio_tasks
from bert_sym.input import tokenizer as vocab_lib
from configs import replication

TRAIN_TEXT = ' = Apples = \n\n' + ''.join(
    f' The orchard grew apples and pears in row {i} , and the farmers sold them . \n'
    for i in range(300))
VALID_TEXT = ' = Zebras = \n\n' + ''.join(
    f' A zebra crossed the river near camp {i} while the guide watched . \n'
    for i in range(40))


def _all_blocks(data_config, split, documents=None):
  blocks = data_lib.load_blocks(data_config, split, documents)
  return np.asarray(blocks.take(np.arange(len(blocks))))


@pytest.fixture(scope='module')
def wikitext_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('wikitext')
  (root / 'wiki.train.tokens').write_text(TRAIN_TEXT)
  (root / 'wiki.valid.tokens').write_text(VALID_TEXT)
  return root


def _export(wikitext_dir, out_dir, *extra):
  code = export_cli.main(['export', '--task=bert_sym_mlm_text_files', '--max_seq_len=64',
                          '--split=validation', f'--out_dir={out_dir}',
                          f'--text_files={wikitext_dir / "wiki.train.tokens"}', *extra])
  assert code == 0


def test_shard_and_seqio_routes_evaluate_on_the_same_text(wikitext_dir, tmp_path):
  config = replication.get_config(str(wikitext_dir))
  # The seqio route as the trainer reads it: the registered task's documents.
  seqio_blocks = _all_blocks(config.data, 'validation', seqio_tasks.task_documents)
  _export(wikitext_dir, tmp_path / 'shards',
          f'--validation_files={config.data.validation_files}')
  shards = config.data.copy_and_resolve_references()
  shards.update(source='shards', shards_dir=str(tmp_path / 'shards'))
  np.testing.assert_array_equal(_all_blocks(shards, 'validation'), seqio_blocks)
  # ... and that text is wiki.valid.tokens, not documents held out of wiki.train.tokens.
  tokens = vocab_lib.read_vocab(vocab_lib.default_vocab_file())
  assert tokens.index('zebra') in seqio_blocks and tokens.index('apples') not in seqio_blocks
  # Without --validation_files the export holds other text (what the flag fixes): the
  # trainer refuses it under a config that names wiki.valid.tokens, and it is indeed other
  # text (documents held out of wiki.train.tokens).
  _export(wikitext_dir, tmp_path / 'held_out')
  shards.shards_dir = str(tmp_path / 'held_out')
  with pytest.raises(DataError, match="exported from --validation_files=''"):
    _all_blocks(shards, 'validation')
  shards.validation_files = ''
  held_out = _all_blocks(shards, 'validation')
  assert tokens.index('zebra') not in held_out


def test_eval_reads_each_validation_block_at_most_once():
  config = replication.get_config()
  lines = []
  assert train.eval_batch_count(4216, config, lines.append) == 256 and not lines
  assert train.eval_batch_count(100, config, lines.append) == 6     # 100 // 16
  assert 'eval reads 6 batches, not config.eval_steps=256' in lines[0]
  assert train.eval_batch_count(10, config, lines.append) == 1
  assert 'some blocks count twice' in lines[1]
  assert train.eval_batch_count(None, config, lines.append) == 256   # size unknown


# ---- The docs quote the committed grid (benchmarks/replication/grid_2026-12-02) ----

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GRID = REPO_ROOT / 'benchmarks' / 'replication' / 'grid_2026-12-02'


def _table_rows(markdown: str) -> list[str]:
  return [line for line in markdown.splitlines() if line.startswith('| ')
          and not line.startswith('| variant')]


@pytest.mark.parametrize('grid', [GRID, GRID / 'pairwise_diagonal'], ids=lambda p: p.name)
def test_replication_page_quotes_the_runner_tables(grid):
  """Every row of the runner's summary.md tables (default target) is on REPLICATION.md as
  the runner wrote it, and the steps columns at each later target: the same runs, no
  hand-edited numbers."""
  page = (REPO_ROOT / 'benchmarks' / 'REPLICATION.md').read_text()
  missing = [row for row in _table_rows((grid / 'summary.md').read_text()) if row not in page]
  for target in ('6.0', '5.95', '5.9'):
    for row in _table_rows((grid / f'summary_target_{target}.md').read_text()):
      cells = [c.strip() for c in row.strip('|').split('|')]
      if len(cells) == 11:   # the main table: variant ... steps, paired steps, ratio, time
        quoted = f'| {float(target):.2f} | {cells[0]} | {" | ".join(cells[7:10])} |'
        missing += [] if quoted in page else [quoted]
  assert not missing, missing


def _t_interval(values):
  """scipy's 95% t interval of the mean (the runner's since 2026-12-06)."""
  values = list(values)
  low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                     scale=scipy.stats.sem(values))
  return np.mean(values), low, high


def test_readme_quotes_the_grid_summary():
  """The grid was summarized with a percentile bootstrap (summary.json keeps it as the
  record); the README quotes t intervals of its per-seed losses, recomputed here by scipy."""
  readme = ' '.join((REPO_ROOT / 'README.md').read_text().split())   # lines rewrapped
  final = json.loads((GRID / 'summary.json').read_text())['per_variant']
  per_seed = lambda grid, variant: grid[variant]['final_eval_loss_per_seed']
  for variant in ('standard', 'symmetric', 'pairwise'):
    mean, low, high = _t_interval(per_seed(final, variant).values())
    assert f'{variant} {mean:.3f} [{low:.3f}, {high:.3f}]' in readme, variant
  later = json.loads((GRID / 'pairwise_diagonal' / 'summary.json').read_text())['per_variant']
  for grid, variant in ((final, 'symmetric'), (final, 'pairwise'),
                        (later, 'pairwise_diagonal')):
    reference = per_seed(grid, 'standard')
    mean, low, high = _t_interval(loss - reference[seed]
                                  for seed, loss in per_seed(grid, variant).items())
    assert f'{variant} {mean:+.3f} [{low:+.3f}, {high:+.3f}]' in readme, variant
  drift = max(abs(later['standard']['final_eval_loss_per_seed'][seed] - loss)
              for seed, loss in final['standard']['final_eval_loss_per_seed'].items())
  assert f'moved by up to {drift:.3f}' in readme
  at_595 = json.loads((GRID / 'summary_target_5.95.json').read_text())['per_variant']
  for variant in ('symmetric', 'pairwise'):
    steps = at_595[variant]['steps_to_target']
    assert (f'{variant} {steps["ratio_to_reference"]:.2f} [{steps["ratio_ci95"][0]:.2f}, '
            f'{steps["ratio_ci95"][1]:.2f}]' in readme), variant


def test_exactly_eval_steps_whole_batches_is_no_warning():
  config = types.SimpleNamespace(eval_steps=6, batch_size=16)
  lines = []
  assert train.eval_batch_count(96, config, lines.append) == 6 and not lines
