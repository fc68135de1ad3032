"""glue_data: readers on the GLUE layouts (the committed fixture; the real files' sizes when
present), their quirks, TFDS, packing, clear errors."""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers

from bert_sym.glue import data as glue_data
from bert_sym.input import tokenizer as vocab
from tests import real_data

GLUE_DIR = real_data.GLUE_DIR
FIXTURE_DIR = real_data.FIXTURE_GLUE_DIR

# (task, split) -> example count of the real files (shared/data/README.md).
REAL_COUNTS = {
    ('cola', 'train'): 8551, ('cola', 'cola'): 1043, ('sst2', 'train'): 67349,
    ('sst2', 'sst2'): 872, ('mrpc', 'train'): 3668, ('mrpc', 'mrpc'): 408,
    ('stsb', 'train'): 5749, ('stsb', 'stsb'): 1500, ('qnli', 'qnli'): 5463,
    ('rte', 'train'): 2490, ('rte', 'rte'): 277, ('wnli', 'train'): 635, ('wnli', 'wnli'): 71,
}


@pytest.mark.real_data
@pytest.mark.parametrize('task,split', sorted(REAL_COUNTS))
def test_real_files_read_completely(task, split):
  spec = glue_data.TASKS[task]
  examples = glue_data.load_split(spec, split, glue_dir=str(GLUE_DIR))
  assert len(examples) == REAL_COUNTS[task, split]
  assert len(examples.texts) == len(spec.tfds_text_keys)
  assert all(t.strip() for t in examples.texts[0][:50])
  if spec.is_regression:
    assert examples.labels.dtype == np.float32
    assert 0.0 <= examples.labels.min() and examples.labels.max() <= 5.0
  else:
    assert set(np.unique(examples.labels)) == set(range(spec.num_labels))


def test_fixture_keeps_the_real_layouts():
  """The fixture's files have the real files' quirks, so the end-to-end tests that read it
  exercise them: CoLA without a header, MRPC's byte-order mark, SST-2's space before the
  tab, STS-B's ten columns."""
  for task, first in (('CoLA', None), ('MRPC', '\ufeffQuality\t#1 ID\t#2 ID'),
                      ('SST-2', 'sentence\tlabel'), ('STS-B', 'index\tgenre\tfilename'),
                      ('RTE', 'index\tsentence1\tsentence2\tlabel')):
    for name in ('train.tsv', 'dev.tsv'):
      line = (FIXTURE_DIR / task / name).read_text(encoding='utf-8').split('\n')[0]
      if first is None:
        assert line.split('\t')[1] in ('0', '1'), line
      else:
        assert line.startswith(first), (task, name)
  assert (FIXTURE_DIR / 'MRPC' / 'dev.tsv').read_bytes()[:3] == b'\xef\xbb\xbf'
  cola = glue_data.load_split(glue_data.TASKS['cola'], 'cola', glue_dir=str(FIXTURE_DIR))
  first_row = (FIXTURE_DIR / 'CoLA' / 'dev.tsv').read_text().split('\n')[0].split('\t')
  assert cola.texts[0][0] == first_row[3] and cola.labels[0] == int(first_row[1])
  assert len(cola) == 20 and cola.idx[0] == 0                 # no row taken as a header
  mrpc = glue_data.load_split(glue_data.TASKS['mrpc'], 'train', glue_dir=str(FIXTURE_DIR))
  assert len(mrpc) == 48 and any('"' in t for t in mrpc.texts[0])   # bare quotes kept
  sst2 = glue_data.load_split(glue_data.TASKS['sst2'], 'train', glue_dir=str(FIXTURE_DIR))
  assert len(sst2) == 48 and sst2.texts[0][0].endswith(' ')


@pytest.mark.real_data
def test_real_file_quirks():
  # CoLA: no header, so the first row is an example.
  cola = glue_data.load_split(glue_data.TASKS['cola'], 'cola', glue_dir=str(GLUE_DIR))
  assert cola.texts[0][0] == 'The sailors rode the breeze clear of the rocks.'
  assert cola.labels[0] == 1 and cola.idx[0] == 0
  # MRPC: the byte-order mark must not hide the 'Quality' column.
  mrpc = glue_data.load_split(glue_data.TASKS['mrpc'], 'mrpc', glue_dir=str(GLUE_DIR))
  assert mrpc.labels[:2].tolist() == [1, 0]
  assert mrpc.texts[1][0].startswith('" The foodservice pie business')
  # String labels map to TFDS ids; RTE dev row 0 is not_entailment (=1).
  rte = glue_data.load_split(glue_data.TASKS['rte'], 'rte', glue_dir=str(GLUE_DIR))
  assert rte.labels[0] == 1
  stsb = glue_data.load_split(glue_data.TASKS['stsb'], 'stsb', glue_dir=str(GLUE_DIR))
  assert stsb.labels[:2].tolist() == [5.0, 4.75]


MNLI_HEADER = ('index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse'
               '\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1')


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding='utf-8')


def _mnli_qqp_dir(root):
  """MNLI and QQP in the download-script layout (their real headers), a few rows each."""
  train = MNLI_HEADER + '\tgold_label\n'
  train += '0\t1\t1n\tgov\t(a)\t(b)\t(A)\t(B)\tA man "sleeps.\tA person rests.\tneutral\tneutral\n'
  train += '1\t2\t2e\tgov\t(a)\t(b)\t(A)\t(B)\tIt rains.\tWater falls.\tentailment\tentailment\n'
  _write(root / 'MNLI' / 'train.tsv', train)
  dev = MNLI_HEADER + '\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n'
  dev += '0\t1\t1c\tfic\t(a)\t(b)\t(A)\t(B)\tHe left.\tHe stayed.\tcontradiction\tc\tc\tc\tc\tcontradiction\n'
  dev += '1\t1\t1x\tfic\t(a)\t(b)\t(A)\t(B)\tNo consensus.\tMaybe.\tneutral\tc\te\tn\te\t-\n'
  _write(root / 'MNLI' / 'dev_matched.tsv', dev)
  _write(root / 'MNLI' / 'dev_mismatched.tsv', dev.replace('He left', 'She left'))
  qqp = 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n'
  qqp += '0\t1\t2\tHow do I "learn?\tWhat is the way to learn?\t1\n'
  qqp += '1\t3\t4\ta malformed row with no second question\n'
  qqp += '2\t5\t6\tWhy?\tWhy not?\t0\n'
  _write(root / 'QQP' / 'train.tsv', qqp)
  _write(root / 'QQP' / 'dev.tsv', qqp)


def test_mnli_and_qqp_layouts(tmp_path):
  _mnli_qqp_dir(tmp_path)
  mnli = glue_data.TASKS['mnli']
  train = glue_data.load_split(mnli, 'train', glue_dir=str(tmp_path))
  assert train.labels.tolist() == [1, 0] and train.texts[0][0] == 'A man "sleeps.'
  matched = glue_data.load_split(mnli, 'mnli_m', glue_dir=str(tmp_path))
  mismatched = glue_data.load_split(mnli, 'mnli_mm', glue_dir=str(tmp_path))
  # gold_label is found by name after 5 annotator labels; '-' (no gold label) is skipped.
  assert matched.labels.tolist() == [2] and mismatched.texts[0] == ['She left.']
  qqp = glue_data.load_split(glue_data.TASKS['qqp'], 'qqp', glue_dir=str(tmp_path))
  assert qqp.labels.tolist() == [1, 0] and qqp.idx.tolist() == [0, 2]   # bad row skipped
  assert qqp.texts[0][0] == 'How do I "learn?'                        # quote kept verbatim


@pytest.fixture
def tfds_mock_data(monkeypatch):
  """TFDS's mock data for the real glue/* builders: nothing is prepared, nothing downloads."""
  monkeypatch.setattr(glue_data, 'TFDS_DOWNLOAD_HOST', None)
  with tfds.testing.mock_data(num_examples=4):
    yield


@pytest.mark.parametrize('name', sorted(glue_data.TASKS))
def test_tfds_source_all_tasks(name, tfds_mock_data):
  """The default TFDS path, on TFDS's mock data for the real glue/* builder."""
  del tfds_mock_data
  spec = glue_data.TASKS[name]
  for split in ['train'] + [d.score_name for d in spec.dev_sets]:
    examples = glue_data.load_split(spec, split)
    assert len(examples) == 4 and len(examples.texts) == len(spec.tfds_text_keys)
    assert isinstance(examples.texts[-1][0], str)
    assert examples.labels.dtype == (np.float32 if spec.is_regression else np.int32)


def test_tfds_unprepared_and_offline_fails_in_seconds(tmp_path, monkeypatch):
  """Not prepared in data_dir and the download host unreachable (here: a closed local
  port): one clear error before tfds.load, instead of minutes of TFDS's retries."""
  # Held bound, never listening, until the probe is refused: a port closed first was free
  # for another xdist worker's listener (a kernel's, gloo's) during the seconds the
  # TensorFlow import takes, and the probe then reached it.
  with socket.socket() as closed:
    closed.bind(('localhost', 0))
    port = closed.getsockname()[1]
    monkeypatch.setattr(glue_data, 'TFDS_DOWNLOAD_HOST', ('localhost', port))
    monkeypatch.setattr(tfds, 'load', lambda *a, **k: pytest.fail('tfds.load was called'))
    with pytest.raises(glue_data.GlueDataError,
                       match=rf'glue/rte is not prepared in {tmp_path}.*localhost:{port} is '
                             r'unreachable.*--config.tfds_data_dir=DIR.*--glue_dir=DIR'):
      glue_data.load_split(glue_data.TASKS['rte'], 'train', tfds_data_dir=str(tmp_path))


def test_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown GLUE task\(s\) \['mnli_m'\].*cola, sst2"):
    glue_data.parse_tasks('cola,mnli_m')
  rte = glue_data.TASKS['rte']
  # No task folder at all: --glue_dir is a level off (it only said to drop the task).
  with pytest.raises(glue_data.GlueDataError, match=r'No directory .*RTE for task rte.*'
                     'holds no GLUE task folder: point --glue_dir at the one that holds RTE/'):
    glue_data.load_split(rte, 'train', glue_dir=str(tmp_path))
  (tmp_path / 'CoLA').mkdir()
  with pytest.raises(glue_data.GlueDataError, match=r'add the files\.$'):   # a task is there
    glue_data.load_split(rte, 'train', glue_dir=str(tmp_path))
  for score in ('nan', 'inf', 'high'):   # 'nan' was a label, and a NaN loss hours later
    with pytest.raises(glue_data.GlueDataError, match=f"x.tsv:2: STS-B score '{score}' is not"):
      glue_data._parse_label(glue_data.TASKS['stsb'], score, 'x.tsv:2')
  assert glue_data._parse_label(glue_data.TASKS['stsb'], ' 3.8 ', 'x.tsv:2') == 3.8
  with pytest.raises(glue_data.GlueDataError, match='not a directory'):
    glue_data.load_split(rte, 'train', glue_dir=str(tmp_path / 'nope'))
  header = 'index\tsentence1\tsentence2\tlabel\n'
  for content, message in (
      ('', 'is empty'),
      ('index\tsentence1\tsentence2\n0\ta\tb\n', r"missing \['label'\].*test.tsv has none"),
      (header, 'header but no examples'),
      (header + '0\ta\tb\tmaybe\n', r"train.tsv:2: label 'maybe'"),
      # A blank line in the middle is dropped, but the error still names the file's line.
      (header + '0\ta\tb\tentailment\n\n1\tc\td\tmaybe\n', r"train.tsv:4: label 'maybe'")):
    _write(tmp_path / 'RTE' / 'train.tsv', content)
    with pytest.raises(glue_data.GlueDataError, match=message):
      glue_data.load_split(rte, 'train', glue_dir=str(tmp_path))
  # A task folder without one of its files (QNLI's train.tsv, left out of many copies for
  # its size): the line named the files, not what to do.
  with pytest.raises(glue_data.GlueDataError,
                     match=r'Missing .*RTE/dev.tsv.*Fix: drop rte from --tasks or add the file'):
    glue_data.load_split(rte, 'rte', glue_dir=str(tmp_path))
  (tmp_path / 'RTE' / 'train.tsv').write_bytes(
      b'index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n')   # Latin-1
  with pytest.raises(glue_data.GlueDataError,
                     match=r'RTE/train.tsv:2: not UTF-8 .*at byte 37.*Re-encode'):
    glue_data.load_split(rte, 'train', glue_dir=str(tmp_path))
  _write(tmp_path / 'CoLA' / 'train.tsv', 'sentence\tlabel\nfine .\t1\n')   # has a header
  with pytest.raises(glue_data.GlueDataError, match='without a header'):
    glue_data.load_split(glue_data.TASKS['cola'], 'train', glue_dir=str(tmp_path))


def test_truncate_longest_first_as_hugging_face():
  """Every pair of lengths 1-14 in budgets 2-17, against BertTokenizerFast's truncation of
  one-token words. Where both sides are cut to an odd budget, the odd token went to the
  first side (Google BERT's rule; 8 + 10 in 9 gave 5 + 4), not to the longer as in HF."""
  hf = _hf_tokenizer()
  for len_a in range(1, 15):
    for len_b in range(1, 15):
      for budget in range(2, 18):
        want = hf(' '.join(['cat'] * len_a), ' '.join(['dog'] * len_b),
                  truncation='longest_first', max_length=budget + 3)['token_type_ids']
        got = glue_data.truncate_longest_first(len_a, len_b, budget)
        assert got == (len(want) - sum(want) - 2, sum(want) - 1), (len_a, len_b, budget)
  assert glue_data.truncate_longest_first(8, 10, 9) == (4, 5)


def test_truncate_longest_first_as_google_bert():
  """config.pair_truncation='bert': run_classifier.py's _truncate_seq_pair, written out."""
  def truncate_seq_pair(len_a, len_b, budget):
    while len_a + len_b > budget:
      if len_a > len_b:
        len_a -= 1
      else:
        len_b -= 1
    return len_a, len_b
  for len_a in range(0, 20):
    for len_b in range(0, 20):
      for budget in range(0, 30):
        assert glue_data.truncate_longest_first(len_a, len_b, budget, 'bert') == (
            truncate_seq_pair(len_a, len_b, budget)), (len_a, len_b, budget)
  assert glue_data.truncate_longest_first(8, 10, 9, 'bert') == (5, 4)


def _hf_tokenizer():
  # transformers>=5 takes the vocab file as `vocab`; older versions as `vocab_file`.
  hf = transformers.BertTokenizerFast(vocab=vocab.default_vocab_file(), do_lower_case=True)
  if len(hf) != 30522:
    hf = transformers.BertTokenizerFast(vocab_file=vocab.default_vocab_file(),
                                        do_lower_case=True)
  return hf


@pytest.mark.parametrize('glue_dir', [
    pytest.param(FIXTURE_DIR, id='fixture'),
    pytest.param(GLUE_DIR, id='real', marks=pytest.mark.real_data)])
def test_packing_equals_hugging_face(glue_dir):
  """[CLS] a [SEP] b [SEP], token types, longest-first truncation: as BertTokenizerFast."""
  tokenizer, hf = glue_data.WordPiece(), _hf_tokenizer()
  for task, max_len in (('rte', 32), ('mrpc', 128), ('cola', 8)):
    examples = glue_data.load_split(glue_data.TASKS[task], task, glue_dir=str(glue_dir)).head(40)
    encoded = glue_data.encode_examples(examples, tokenizer, max_len)
    want = hf(*examples.texts, truncation='longest_first', max_length=max_len)
    for i in range(len(examples)):
      assert encoded.input_ids[i].tolist() == want['input_ids'][i], (task, i)
      assert encoded.token_type_ids[i].tolist() == want['token_type_ids'][i], (task, i)


def test_pad_batch_and_buckets():
  encoded = glue_data.Encoded(
      input_ids=[np.arange(1, 6), np.arange(1, 21), np.arange(1, 3)],
      token_type_ids=[np.zeros(5, int), np.ones(20, int), np.zeros(2, int)],
      labels=np.array([1, 0, 1], np.int32), idx=np.arange(3))
  batch = glue_data.pad_batch(encoded, np.array([0, 2]), 4, 128, pad_id=0)
  assert batch['input_ids'].shape == (4, 16)                   # smallest bucket
  assert batch['weights'].tolist() == [1, 1, 0, 0]            # padding rows carry no loss
  assert batch['attention_mask'][0].sum() == 5
  assert glue_data.pad_batch(encoded, np.array([1]), 4, 128, 0)['input_ids'].shape == (4, 32)
  assert glue_data.pad_batch(encoded, np.array([1]), 4, 128, 0, bucket=False)[
      'input_ids'].shape == (4, 128)
  assert glue_data.bucket_length(100, 128) == 128 and glue_data.bucket_length(65, 96) == 96


def test_pad_batch_keeps_the_second_sentences_token_types():
  encoded = glue_data.Encoded([np.arange(1, 6)], [np.array([0, 0, 1, 1, 1])],
                              np.array([1], np.int32), np.arange(1))
  batch = glue_data.pad_batch(encoded, np.array([0]), 2, 128, pad_id=0)
  assert batch['token_type_ids'][0, :5].tolist() == [0, 0, 1, 1, 1]


def test_a_label_id_out_of_range_is_an_error(tmp_path):
  (tmp_path / 'RTE').mkdir()
  (tmp_path / 'RTE' / 'train.tsv').write_text('index\tsentence1\tsentence2\tlabel\n0\ta\tb\t2\n')
  with pytest.raises(glue_data.GlueDataError, match="label '2'"):
    glue_data.load_split(glue_data.TASKS['rte'], 'train', glue_dir=str(tmp_path))
  for digit in ('\u00b2', '\u0661'):   # a superscript 2 was int()'s ValueError, no file named
    with pytest.raises(glue_data.GlueDataError, match=f"x.tsv:2: label '{digit}'"):
      glue_data._parse_label(glue_data.TASKS['rte'], digit, 'x.tsv:2')


def test_an_stsb_score_outside_0_to_5_is_an_error_naming_file_and_line(tmp_path):
  """A corrupted score (50 for 5.0) was read as it is and trained on, silently."""
  header = ('index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t'
            'sentence2\tscore\n')
  row = '{}\tmain\tf\t2012\t0\tnone\tnone\ta\tb\t{}\n'
  stsb = glue_data.TASKS['stsb']
  for bad in ('50', '5.001', '-0.5'):
    _write(tmp_path / 'STS-B' / 'train.tsv', header + row.format(0, '5.000') + row.format(1, bad))
    with pytest.raises(glue_data.GlueDataError,
                       match=rf"STS-B/train.tsv:3: STS-B score '{bad}' is outside 0..5"):
      glue_data.load_split(stsb, 'train', glue_dir=str(tmp_path))
  _write(tmp_path / 'STS-B' / 'train.tsv', header + row.format(0, '5.000') + row.format(1, '0'))
  assert glue_data.load_split(stsb, 'train', glue_dir=str(tmp_path)).labels.tolist() == [5, 0]


def test_empty_texts_are_trained_on_with_a_warning_that_counts_them(tmp_path, caplog):
  """A row whose sentence column is empty packed as [CLS] a [SEP] [SEP] and trained on,
  with nothing said. Kept (a real file may hold a few), but counted in a warning per
  field, naming the first one's line; the check before training stays quiet."""
  _write(tmp_path / 'RTE' / 'train.tsv', 'index\tsentence1\tsentence2\tlabel\n'
         '0\tA cat.\t\tentailment\n1\tok\tfine\tentailment\n2\tA dog.\t \tentailment\n'
         '3\t\tA bird.\tnot_entailment\n')
  rte = glue_data.TASKS['rte']
  glue_data.check_tsv(tmp_path / 'RTE' / 'train.tsv', rte)
  assert not caplog.records
  examples = glue_data.load_split(rte, 'train', glue_dir=str(tmp_path))
  assert len(examples) == 4 and examples.texts[1][0] == ''
  warnings = sorted(r.getMessage() for r in caplog.records if r.levelname == 'WARNING')
  assert len(warnings) == 2, warnings
  assert warnings[0].endswith('RTE/train.tsv: 1 of 4 examples have an empty sentence1 (the '
                              'first at line 5): each is packed with no tokens for it and '
                              'kept as it is (trained on, or scored in a dev set).')
  assert 'RTE/train.tsv: 2 of 4 examples have an empty sentence2 (the first at line 2)' in (
      warnings[1])


def test_a_bad_row_far_down_a_later_tasks_file_is_found_before_any_task_trains(tmp_path):
  """The check before training read each file's first rows only: a label or a byte further
  down a later task's train.tsv stopped the run when that task's turn came, hours on."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from bert_sym.glue import suite  # pylint: disable=import-outside-toplevel
  header = 'index\tsentence1\tsentence2\tlabel\n'
  rows = ''.join(f'{i}\ta\tb\tentailment\n' for i in range(5))
  for name in ('train.tsv', 'dev.tsv'):
    _write(tmp_path / 'RTE' / name, header + rows)
  config = ml_collections.ConfigDict(dict(glue_dir=str(tmp_path), tfds_data_dir=''))
  specs = glue_data.parse_tasks('rte')
  suite.check_data(config, specs)
  _write(tmp_path / 'RTE' / 'train.tsv', header + rows + '5\ta\tb\tmaybe\n')
  with pytest.raises(glue_data.GlueDataError, match=r"RTE/train.tsv:7: label 'maybe'"):
    suite.check_data(config, specs)
  (tmp_path / 'RTE' / 'train.tsv').write_bytes((header + rows).encode() + b'5\tcaf\xe9\tb\t0\n')
  with pytest.raises(glue_data.GlueDataError, match=r'RTE/train.tsv:7: not UTF-8'):
    suite.check_data(config, specs)


def test_a_row_missing_its_last_column_is_skipped_not_a_traceback(tmp_path):
  (tmp_path / 'RTE').mkdir()
  (tmp_path / 'RTE' / 'train.tsv').write_text(
      'index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\n')
  assert len(glue_data.load_split(glue_data.TASKS['rte'], 'train', glue_dir=str(tmp_path))) == 1


def test_head_0_or_less_is_every_example():
  examples = glue_data.Examples(np.arange(3), (['a', 'b', 'c'],), np.zeros(3, np.int32))
  assert len(examples.head(0)) == 3 and len(examples.head(-1)) == 3
  assert len(examples.head(2)) == 2


def test_mnli_dev_sets_read_their_own_tfds_splits():
  matched, mismatched = glue_data.TASKS['mnli'].dev_sets
  assert (matched.score_name, matched.tfds_split) == ('mnli_m', 'validation_matched')
  assert (mismatched.score_name, mismatched.tfds_split) == ('mnli_mm', 'validation_mismatched')


def test_prepared_tfds_data_needs_no_network(monkeypatch):
  """An offline host whose TFDS glue/* is prepared must not be refused as unreachable."""
  monkeypatch.setattr(glue_data, 'TFDS_DOWNLOAD_HOST', ('localhost', 1))
  monkeypatch.setattr(socket, 'create_connection', lambda *a, **k: pytest.fail('probed'))
  builder = type('Builder', (), {'is_prepared': lambda self: True, 'data_dir': 'D'})()
  monkeypatch.setattr(tfds, 'builder', lambda *a, **k: builder)
  glue_data.check_tfds_can_load(glue_data.TASKS['rte'])
