"""bert_sym.config_check.preflight: what a run needs, checked before anything is written."""

import importlib
import json
import os
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from bert_sym import cli
from bert_sym import config_check
from bert_sym import model as model_lib
from configs import common
from configs import from_json
from configs import glue as glue_config


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


def test_from_json_without_a_path_says_its_usage():
  """`--config=configs/from_json.py` without `:PATH`: ml_collections calls get_config()
  with no argument, which raised a TypeError before the usage line could be said."""
  with pytest.raises(ValueError, match=r'Usage: --config=configs/from_json.py:/path/to/'):
    from_json.get_config()


def test_from_json_of_a_file_that_is_not_a_config_json_names_it(tmp_path):
  """A truncated config.json or metrics.jsonl: ml_collections re-raised the JSONDecodeError
  as type(e)(text), so the one line said "JSONDecodeError.__init__() missing 2 required
  positional arguments" and named neither the file nor the fix."""
  (tmp_path / 'metrics.jsonl').write_text('{"step": 0}\n{"step": 10}\n')
  (tmp_path / 'list.json').write_text('[1, 2]')
  message = _config_flag(f'configs/from_json.py:{tmp_path / "metrics.jsonl"}')
  assert message == (
      f'the config file does not load: ValueError: {tmp_path / "metrics.jsonl"} is not a '
      'config.json (Extra data: line 2 column 1 (char 12)). Fix: --config=configs/'
      'from_json.py:WORKDIR/config.json (the file the trainer wrote into the old run).')
  message = _config_flag(f'configs/from_json.py:{tmp_path / "list.json"}')
  assert f'{tmp_path / "list.json"} is not a config.json (JSON [1, 2], not an object). Fix:' in message


def test_memory_mapped_shards_from_a_url_name_the_streaming_source():
  """source='shards' memory-maps files: from gs:// it used to fail later, on a mangled
  local path ('gs:/bucket/...'), instead of naming the source that reads URLs."""
  config = common.base_config('tiny')
  config.data.update(dict(source='shards', shards_dir='gs://bucket/c4_512'))
  with pytest.raises(config_check.ConfigError, match='--config.data.source=streaming'):
    config_check.check(config)
  config.data.source = 'streaming'
  config_check.check(config)


def _bert_num_to_predict(num_tokens, masked_lm_prob, max_predictions_per_seq):
  """google-research/bert create_pretraining_data.py, create_masked_lm_predictions."""
  return min(max_predictions_per_seq, max(1, int(round(num_tokens * masked_lm_prob))))


def test_a_prediction_cap_that_would_cut_mask_rate_is_refused():
  """max_predictions_per_seq caps the masked tokens of a row: set below what mask_rate asks
  of a full row, the run silently masked less (tiny at mask_rate=0.4: 16%, not 40%)."""
  config = common.base_config('tiny')
  config.data.update(dict(max_seq_len=64, max_predictions_per_seq=10, mask_rate=0.4))
  with pytest.raises(config_check.ConfigError,
                     match=r'mask_rate=0\.4 .*max_predictions_per_seq=10 caps.*Fix: '
                           r'--config\.data\.max_predictions_per_seq=26'):
    config_check.check(config)
  # Refused exactly when BERT's per-row count for a full row is cut by the cap (all but
  # [CLS] and [SEP] can be masked, so a cap of max_seq_len - 2 cuts nothing).
  for max_seq_len, mask_rate in [(16, 0.15), (64, 0.15), (64, 0.4), (128, 0.15), (128, 0.2),
                                 (512, 0.15), (10, 0.9)]:
    wanted = _bert_num_to_predict(max_seq_len, mask_rate, max_seq_len - 2)
    for cap in range(1, max_seq_len - 1):
      config.data.update(dict(max_seq_len=max_seq_len, mask_rate=mask_rate,
                              max_predictions_per_seq=cap))
      cut = _bert_num_to_predict(max_seq_len, mask_rate, cap) < wanted
      try:
        config_check.check_data(config.data, config.model)
        refused = False
      except config_check.ConfigError as e:
        assert f'max_predictions_per_seq={wanted}' in str(e)
        refused = True
      assert refused == cut, (max_seq_len, mask_rate, cap)
  # Above max_seq_len - 2 a slot is always padding, whatever the rate: refused from the
  # first one (only 1000 was tried, so max_seq_len - 1 passed).
  for cap, refused in ((62, False), (63, True), (64, True)):
    config.data.update(dict(max_seq_len=64, mask_rate=0.15, max_predictions_per_seq=cap))
    try:
      config_check.check_data(config.data, config.model)
      assert not refused, cap
    except config_check.ConfigError as e:
      assert refused and 'exceeds the 62 maskable positions' in str(e), (cap, str(e))


@pytest.mark.parametrize('flag', ['--config', '--workdir'])
def test_a_run_flag_given_twice_is_refused(flag):
  """absl keeps the last: a launcher's --workdir plus the user's trained in another
  directory than the one the launcher announced (and looked in to resume)."""
  argv = ['bert_sym.train', f'{flag}=a', '--config.seed=1', f'{flag}=b']
  with pytest.raises(cli.UserError, match=f'{flag} is given 2 times [(]{flag}=a, {flag}=b[)]'):
    config_check.parse_flags(argv)


def test_the_paper_lengths_and_every_shipped_config_pass_the_check():
  for max_seq_len, max_predictions in ((128, 20), (512, 80)):   # BERT's two phases
    config = common.base_config('base')
    config.data.update(dict(max_seq_len=max_seq_len, max_predictions_per_seq=max_predictions))
    config_check.check(config)
  for name in ('sym_base', 'std_base', 'sym_small', 'std_small', 'tiny', 'replication'):
    config_check.check(importlib.import_module(f'configs.{name}').get_config())


def _config_flag(value):
  """--config=value as the trainer reads it (bert_sym.cli.run: the path located, absl +
  config_flags parsing, a config file that did not load checked); the config, or the one
  line the user sees."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values)
  try:
    flag_values(cli.locate_config_files(['bert_sym.train', f'--config={value}']))
    cli.check_config_files(flag_values)
  except Exception as e:  # pylint: disable=broad-except
    message = cli.user_error_message(e)
    assert message is not None, e   # None: a traceback, not one line
    return message
  return flag_values.config


@pytest.mark.parametrize('name', ['sym_small', 'std_small', 'sym_base', 'std_base'])
def test_the_recipe_argument_of_a_config_is_applied_and_a_typo_refused(name):
  """`configs/sym_small.py:fast` ran the paper recipe: the small configs dropped their
  argument, so any recipe, or a typo of one, was silently ignored."""
  paper, fast = _config_flag(f'configs/{name}.py'), _config_flag(f'configs/{name}.py:fast')
  assert (paper.model.attention_impl, paper.model.attention_dropout_rate) == ('xla', 0.1)
  assert (fast.model.attention_impl, fast.model.attention_dropout_rate) == ('auto', 0.0)
  assert _config_flag(f'configs/{name}.py:paper').to_dict() == paper.to_dict()
  message = _config_flag(f'configs/{name}.py:fsat')
  assert "Unknown recipe 'fsat'" in message and "'fast'" in message, message
  assert '..' not in message and message.count('Fix:') == 1, message   # one sentence each


def test_tiny_refuses_an_argument_it_would_ignore():
  assert _config_flag('configs/tiny.py').model.num_layers == 2
  message = _config_flag('configs/tiny.py:fast')
  assert "configs/tiny.py takes no argument, got 'fast'" in message, message
  assert 'Fix: --config=configs/tiny.py' in message, message
  assert '..' not in message and message.count('Fix:') == 1, message   # its own fix only


def test_config_files_that_do_not_load_are_one_line_naming_file_and_line(tmp_path):
  (tmp_path / 'syntax.py').write_text('def get_config(:\n  pass\n')
  (tmp_path / 'imports.py').write_text('import no_such_module\n')
  message = _config_flag(str(tmp_path / 'syntax.py'))
  assert f'{tmp_path / "syntax.py"}, line 1: SyntaxError' in message, message
  message = _config_flag(str(tmp_path / 'imports.py'))
  assert (f"{tmp_path / 'imports.py'}, line 1: ModuleNotFoundError: No module named "
          "'no_such_module'") in message, message


def test_a_users_config_file_imports_configs_from_any_directory(tmp_path):
  """A config of one's own beside one's data, built on this checkout's configs/, run from
  its directory: `configs` was importable only from the checkout."""
  (tmp_path / 'mine.py').write_text(
      'from configs import tiny\n\ndef get_config():\n  c = tiny.get_config()\n'
      '  c.model.num_layers = 1\n  return c\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, '-m', 'bert_sym.train', '--config=mine.py',
                           '--dry_run'], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'configs' not in result.stderr


def test_sharding_rules_can_be_overridden_also_in_a_rerun_from_config_json(tmp_path):
  """--help lists --config.sharding_rules, but as a list ml_collections refused any
  override of it (and config.json turns tuples into lists)."""
  rules = "(('batch', 'data'), ('embed', 'fsdp'), ('kv', None))"
  config = _config_flag('configs/tiny.py')
  (tmp_path / 'config.json').write_text(config.to_json())
  for source in ('configs/tiny.py', f'configs/from_json.py:{tmp_path / "config.json"}',
                 f'configs/from_json.py:{tmp_path}'):   # a workdir, too
    argv = cli.locate_config_files(['bert_sym.train', f'--config={source}',
                                    f'--config.sharding_rules={rules}'])
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert flag_values.config.sharding_rules == (('batch', 'data'), ('embed', 'fsdp'),
                                                 ('kv', None)), source


def test_a_config_of_the_other_command_is_named_as_such():
  with pytest.raises(config_check.ConfigError, match=r"no 'model': it is not a training "
                                                    r"config.*Fix: --config=configs/tiny.py"):
    config_check.check(glue_config.get_config())
  with pytest.raises(config_check.ConfigError, match=r"no 'tasks': it is not a GLUE config"
                                                    r".*Fix: --config=configs/glue.py"):
    config_check.check_glue(common.base_config('tiny'))


@pytest.mark.parametrize('key, value, message', [
    ('model.remat_policy', 'bogus', "remat_policy='bogus' is not one of: full, dots"),
    ('optimizer.weight_decay', -0.01, 'weight_decay=-0.01 must be a finite number >= 0'),
    ('optimizer.grad_clip_norm', -1.0, 'grad_clip_norm=-1.0 must be a finite number >= 0'),
    ('optimizer.weight_decay', float('inf'), 'weight_decay=inf must be a finite number >= 0'),
    ('peak_flops_per_device', -1e12, 'peak_flops_per_device=-1000000000000.0 must be a '
     'finite'),   # a negative MFU on every line
    ('checkpoint.save_timeout_s', 0, 'save_timeout_s=0 must be an integer >= 1'),
    ('optimizer.b1', 1.0, 'optimizer.b1=1.0 must lie in [0, 1)'),
    ('optimizer.b2', -0.1, 'optimizer.b2=-0.1 must lie in [0, 1)'),
    ('optimizer.learning_rate', 0.0, 'learning_rate=0.0 must be > 0'),   # nothing would move
    # Adam's 0 / (0 + 0) in embedding rows no batch touched: NaN parameters, a healthy loss.
    ('optimizer.eps', 0.0, 'optimizer.eps=0.0 must be > 0 (the paper: 1e-12)'),
    # nan and inf passed: the run trained, then stopped at step 2 on a NaN loss, saying to
    # lower the learning rate.
    ('optimizer.learning_rate', float('nan'), 'learning_rate=nan must be > 0 (the paper: '
                                              '0.0001) and finite. Fix:'),
    ('optimizer.learning_rate', float('inf'), 'learning_rate=inf must be > 0'),
    ('optimizer.eps', float('nan'), 'optimizer.eps=nan must be > 0'),
    ('model.hidden_size', 130, 'hidden_size=130 is not divisible by'),
    ('data.max_seq_len', 513, 'exceeds 512, the longest block the input pipeline packs'),
    ('model.max_position_embeddings', 256, 'exceeds config.model.max_position_embeddings=256'),
    ('data.validation_files', '/data/valid.txt', 'validation_files is set but'),
    # The seqio source never reads shards: the run trained on the task's text instead.
    ('data.shards_dir', '/data/shards', "shards_dir is set but config.data.source='seqio'"),
])
def test_training_values_refused_up_front(key, value, message):
  config = common.base_config('tiny')
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(config_check.ConfigError, match=re.escape(message)):
    config_check.check(config)


def test_a_model_with_more_positions_is_not_blamed_for_the_input_pipelines_limit():
  """max_position_embeddings=1024 and max_seq_len=768 passed the checks, then the input
  pipeline refused 768 saying the model had 512 position embeddings."""
  config = common.base_config('tiny')
  config.model.max_position_embeddings, config.data.max_seq_len = 1024, 768
  with pytest.raises(config_check.ConfigError, match=r'max_seq_len=768 exceeds 512, the '
                     r'longest block the input pipeline packs and masks \(BERT'):
    config_check.check(config)


def test_the_remat_policies_checked_are_the_models():
  assert set(config_check.REMAT_POLICIES) == set(model_lib.REMAT_POLICIES)


@pytest.mark.parametrize('overrides, message', [
    (dict(grad_accum_steps=3), 'batch_size=16 is not divisible by config.grad_accum_steps=3'),
    (dict(batch_size=0), 'batch_size=0 must be an integer >= 1'),
    (dict(eval_batch_size=0), 'eval_batch_size=0 must be an integer >= 1'),
    (dict(epochs=0.0), 'epochs=0.0 must be > 0'),
    (dict(learning_rate=-1.0), 'learning_rate=-1.0 must be > 0'),
    (dict(learning_rate=float('inf')), 'learning_rate=inf must be > 0 and finite'),
    (dict(epochs=float('inf')), 'epochs=inf must be > 0 and finite'),   # was a traceback
    (dict(warmup_ratio=1.5), 'warmup_ratio=1.5 must lie in [0, 1]'),
    (dict(on_nonfinite='Stop'), "on_nonfinite='Stop' is not one of: stop, skip"),
    (dict(pair_truncation='longest'), "pair_truncation='longest' is not one of: hf, bert"),
    (dict(max_consecutive_nonfinite=0), 'max_consecutive_nonfinite=0 must be an integer'),
    (dict(max_seq_len=4), 'max_seq_len=4 cannot hold a sentence pair'),
    (dict(grad_clip_norm=-1.0), 'grad_clip_norm=-1.0 must be a finite number >= 0'),
    (dict(b2=1.0), 'b2=1.0 must lie in [0, 1)'),
    (dict(b1=-0.1), 'b1=-0.1 must lie in [0, 1)'),
    # As in pre-training: a negative MFU on every GLUE progress line.
    (dict(peak_flops_per_device=-1e12), 'peak_flops_per_device=-1000000000000.0 must be a '
                                        'finite number >= 0'),
])
def test_glue_values_refused_before_any_output(overrides, message):
  """Each of these ran: to a reshape traceback at the first compile (grad_accum_steps),
  a ZeroDivisionError, an untrained classifier scored as a result (epochs=0), updates the
  wrong way (a negative learning rate), or 'skip' for a mistyped 'stop'."""
  config = glue_config.get_config()
  config.update(overrides)
  with pytest.raises(config_check.ConfigError, match=re.escape(message)):
    config_check.check_glue(config)
  config_check.check_glue(glue_config.get_config('runlocal'))   # the shipped ones pass


def test_a_config_file_in_the_current_directory_wins_over_the_checkouts(tmp_path,
                                                                        monkeypatch):
  """A user's own configs/tiny.py (or a second clone's) must not be replaced silently by
  the installed checkout's file of the same name."""
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'tiny.py').write_text('# the user\'s own\n')
  monkeypatch.chdir(tmp_path)
  assert cli.locate_config_files(['prog', '--config=configs/tiny.py']) == [
      'prog', '--config=configs/tiny.py']
  assert cli.locate_config_files(['prog', '--config=configs/sym_base.py']) == [
      'prog', f'--config={cli.CHECKOUT / "configs" / "sym_base.py"}']


def test_ctrl_c_outside_the_loop_exits_130_and_permission_errors_are_one_line():
  """Ctrl-C in start-up or compilation (outside the training loop's own handling) must
  exit 130, which launchers tell apart from a user error (1)."""
  with pytest.raises(SystemExit) as exit_info:
    with cli.guard('prog'):
      raise KeyboardInterrupt
  assert exit_info.value.code == cli.EXIT_INTERRUPTED == 130
  message = cli.user_error_message(PermissionError(13, 'Permission denied', '/data/out'))
  assert message and '/data/out' in message
  # A full disk or too many open files outside a checkpoint save: one line with the fix,
  # not a traceback; an OSError of another kind stays a bug's traceback.
  message = cli.user_error_message(OSError(28, 'No space left on device', '/data/out/x'))
  assert message and '/data/out/x' in message and 'the disk is full. Fix: free space' in message
  message = cli.user_error_message(OSError(24, 'Too many open files'))
  assert message and 'ulimit -n' in message
  assert cli.user_error_message(OSError(5, 'Input/output error')) is None


def test_an_override_without_a_config_file_asks_for_the_file():
  """`--config.total_steps=5` without --config said "Unknown command line flag
  'config.total_steps'": the key exists, the file that defines it was not given."""
  result = subprocess.run([sys.executable, '-m', 'bert_sym.train', '--dry_run',
                           '--config.total_steps=5'], cwd=cli.CHECKOUT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == cli.EXIT_USER_ERROR
  assert result.stderr.splitlines()[-1] == (
      'bert_sym.train: error: --config.total_steps overrides a value of the --config file, '
      'and no --config is given. Fix: add --config=FILE, e.g. --config=configs/tiny.py (see '
      '--help).')


def test_an_error_exit_of_one_of_several_processes_says_its_message(monkeypatch, capsys):
  """bert_sym.glue stops on its input errors with SystemExit('bert_sym.glue: error: ...');
  Python prints that message at exit, but one of several processes leaves by os._exit,
  so on 2 processes (--glue_dir missing on one) both exited 1 without a word."""
  class Left(Exception):
    pass

  def leave(code):
    raise Left(code)

  def main(argv):
    raise SystemExit('bert_sym.glue: error: /data/glue: no such directory')

  monkeypatch.setattr(cli, 'one_of_several_processes', lambda: True)
  monkeypatch.setattr(cli, '_leave_together', lambda: None)
  monkeypatch.setattr(os, '_exit', leave)
  with pytest.raises(Left, match=str(cli.EXIT_USER_ERROR)):
    cli.run(main, prog='bert_sym.glue', argv=['bert_sym.glue'])
  assert capsys.readouterr().err == 'bert_sym.glue: error: /data/glue: no such directory\n'


def test_a_table_one_row_short_of_the_data_vocabulary_is_refused():
  """The data's top token id needs a row: vocab_size = data vocabulary - 1 leaves id N-1
  without an embedding (a gather clamps it silently on accelerators)."""
  from bert_sym.input import iterator  # pylint: disable=g-import-not-at-top
  config = common.base_config('tiny')
  data_vocab = len(iterator.load_blocks(config.data, 'train').vocab_tokens)
  config.model.vocab_size = data_vocab - 1
  with pytest.raises(config_check.ConfigError, match=f'has {data_vocab} tokens but'):
    config_check.check_corpus(config)
  config.model.vocab_size = data_vocab
  config_check.check_corpus(config)


@pytest.mark.parametrize('source, shards_dir, refused', [
    ('streaming', '', True), ('streaming', 'gs://bucket/c4_512', False), ('seqio', '', False)])
def test_a_launch_must_name_the_shards_a_shard_source_reads(source, shards_dir, refused):
  """`check` passes configs/sym_base.py (source streaming) without shards: bert_sym.aot
  sizes a slice for it. check_data_named, which the TPU launcher asks for, refuses it with
  the export command. (Source 'shards' without them is refused by `check` itself.)"""
  config = importlib.import_module('configs.sym_base').get_config()
  config.data.source, config.data.shards_dir = source, shards_dir
  config_check.check(config)
  if not refused:
    config_check.check_data_named(config)
    return
  with pytest.raises(config_check.ConfigError, match=(
      f"config.data.source='{source}' reads config.data.task='bert_sym_mlm_c4' from exported "
      r'shards, and config.data.shards_dir is not set\. Fix: prepare it once: .*'
      r'python -m bert_sym.shards export --task=bert_sym_mlm_c4 ')):
    config_check.check_data_named(config)


def test_a_config_file_without_get_config_is_named_as_such():
  """configs/common.py (the defaults the experiment files share) given as --config printed
  '(cannot list the config keys ...)' and then "unknown config key 'module'" (the first
  word of AttributeError's "module 'config_config' has no attribute 'get_config'")."""
  for program, args in (('train', ['--dry_run']),   # ablate parses --config itself
                        ('ablate', ['--workdir=unused', '--variants=standard', '--seeds=1'])):
    result = subprocess.run([sys.executable, '-m', f'bert_sym.{program}',
                             '--config=configs/common.py', *args], cwd=cli.CHECKOUT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f'bert_sym.{program}: error: the config file defines no '
                                    'get_config(): it is not an experiment config. Fix:'), (
                                        result.stderr)
    assert result.stderr.count('\n') == 1 and 'module' not in result.stdout + result.stderr


def test_overrides_typed_before_the_config_file_apply():
  """`--config.total_steps=-5 --config=configs/tiny.py` stopped with ml_collections'
  "Found --config.total_steps=-5 in argv before a value for --config was specified",
  which names no fix; ablate took either order. Now the file is read first and the
  override applies (its own check refuses -5), for both spellings of --config, and in
  bert_sym.glue (which adds its default --config when none is given)."""
  assert cli._config_file_first(['p', '--config.a=1', '--x', '--config=f.py', '--config.b=2']) \
      == ['p', '--config=f.py', '--config.a=1', '--x', '--config.b=2']
  assert cli._config_file_first(['p', '--config.a=1', '--config', 'f.py']) == \
      ['p', '--config', 'f.py', '--config.a=1']
  assert cli._config_file_first(['p', '--config=f.py', '--config.a=1']) == \
      ['p', '--config=f.py', '--config.a=1']
  for config in (['--config=configs/tiny.py'], ['--config', 'configs/tiny.py']):
    result = subprocess.run([sys.executable, '-m', 'bert_sym.train', '--config.total_steps=-5',
                             *config, '--dry_run'], cwd=cli.CHECKOUT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith('bert_sym.train: error: config.total_steps=-5 must be an '
                                    'integer >= 1.'), result.stderr
  result = subprocess.run([sys.executable, '-m', 'bert_sym.glue', '--config.learning_rate=-1',
                           '--config=configs/glue.py', '--checkpoint=unused',
                           '--output_dir=unused'], cwd=cli.CHECKOUT,
                          capture_output=True, text=True, timeout=120)
  assert result.stderr.startswith('bert_sym.glue: error: config.learning_rate=-1.0 must be > 0'), (
      result.stderr)


def test_a_negated_boolean_override_typed_before_the_config_file_applies():
  """absl's spelling of a false boolean, `--noconfig.KEY`, which ml_collections reads as an
  override too, was left where it was typed: before --config it still stopped with "Found
  --noconfig.model.scan_layers in argv before a value for --config was specified"."""
  assert cli._config_file_first(['p', '--noconfig.a', '--config=f.py']) == \
      ['p', '--config=f.py', '--noconfig.a']
  result = subprocess.run([sys.executable, '-m', 'bert_sym.train', '--noconfig.model.scan_layers',
                           '--config=configs/tiny.py', '--dry_run'], cwd=cli.CHECKOUT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def _parsed(argv):
  """argv parsed as bert_sym.train parses its --config, on flags of its own."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values


@pytest.mark.parametrize('group, refused', [
    ("{'data': 2}", 'leaves out fsdp, tensor. Fix: set its keys one by one: '
                    '--config.mesh.data=2 (--help lists them).'),
    ("{'data': 2, 'fsdp': 1, 'tensor': 1, 'tensr': 2}", 'names keys the group does not have: '
                                                       'tensr. Fix: '),
    ("{'data': 2, 'fsdp': 1, 'tensr': 1}", 'leaves out tensor and names keys the group does '
     'not have: tensr. Fix: set its keys one by one: --config.mesh.data=2 '
     '--config.mesh.fsdp=1 (--help lists them).'),   # not --config.mesh.tensr=1: unknown too
    ("{'data': 2, 'fsdp': 1, 'tensor': 1}", None)])
def test_a_group_given_as_a_dict_must_hold_exactly_its_keys(group, refused):
  """ml_collections puts the dict in place of the whole group: the keys it left out were
  gone (a KeyError traceback in the config check), a mistyped one was taken silently."""
  values = _parsed(['p', '--config=configs/tiny.py', f'--config.mesh={group}'])
  if refused is None:
    cli.check_group_overrides(values)
    cli.check_group_overrides(_parsed(['p']))   # no --config: the trainer's own line, later
    assert values.config.mesh.data == 2
    return
  with pytest.raises(cli.UserError) as error:
    cli.check_group_overrides(values)
  assert str(error.value).startswith('--config.mesh=... replaces the whole group config.mesh '
                                     'and ') and refused in str(error.value), str(error.value)


@pytest.mark.parametrize('typed, fix', [
    ('1e4', '--config.total_steps=10000.'), ('10000.0', '--config.total_steps=10000.'),
    ('0.5', '--config.total_steps=<a whole number>.')])
def test_an_integer_key_written_as_a_float_names_the_whole_number(typed, fix):
  """--config.total_steps=1e4 (as papers write step counts) was "invalid literal for int()
  with base 10: '1e4' (see --help)", naming no fix."""
  with pytest.raises(flags.Error) as error:
    _parsed(['p', '--config=configs/tiny.py', f'--config.total_steps={typed}'])
  said = f'--config.total_steps={typed}: config.total_steps is an integer. Fix: {fix}'
  absl_int = flags.FlagValues()   # an integer flag of absl's own: its name, not a config's
  flags.DEFINE_integer('num_processes', None, 'processes', flag_values=absl_int)
  with pytest.raises(flags.Error) as not_config:
    absl_int(['p', f'--num_processes={typed}'])
  assert cli.user_error_message(not_config.value).startswith(
      f'--num_processes={typed}: num_processes is an integer. Fix: --num_processes='), (
          cli.user_error_message(not_config.value))
  assert cli.user_error_message(error.value) == said
  from bert_sym import ablate  # pylint: disable=g-import-not-at-top
  with pytest.raises(ablate.AblationError, match=re.escape(said)):   # the runner says it too
    ablate.resolve_config('configs/tiny.py', [f'--config.total_steps={typed}'])


def test_a_group_given_one_value_says_it_is_a_group():
  """--config.model=standard was "Failed to parse 'standard' as a ConfigDict:
  ValueError('malformed node or string on line 1: <ast.Name object at 0x...>')"."""
  with pytest.raises(flags.Error) as error:
    _parsed(['p', '--config=configs/tiny.py', '--config.model=standard'])
  assert cli.user_error_message(error.value) == (
      '--config.model is a group of keys, not one value. Fix: --config.model.KEY=VALUE for '
      'each key to change (--help lists them).')


@pytest.mark.parametrize('override, message', [
    ('--config.data.max-seq-len=64', '--config.data.max-seq-len=64 names no config key: keys '
     'are words of letters, digits and _ joined by single dots. Fix: '
     '--config.data.max_seq_len=64 (--help lists the keys).'),
    ('--config.model..attention=standard', 'Fix: --config.model.attention=standard '),
    ('--config.model.attention.=standard', 'Fix: --config.model.attention=standard '),
    ("--config.sharding_rules[1]=('vocab', None)", 'sets one item of config.sharding_rules. '
     'Fix: --config.sharding_rules="((...), ...)" (the whole tuple).')])
def test_an_override_whose_key_is_malformed_is_one_line(override, message):
  """Dashes for underscores, a doubled dot: a ValueError traceback from ml_collections. One
  item of a tuple: "names no config key ... Fix: --config.A.B=VALUE", no way to do it."""
  result = subprocess.run([sys.executable, '-m', 'bert_sym.train', '--config=configs/tiny.py',
                           override, '--dry_run'], cwd=cli.CHECKOUT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.startswith('bert_sym.train: error: ') and message in result.stderr, (
      result.stderr[-2000:])
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
  from bert_sym import ablate  # pylint: disable=g-import-not-at-top
  with pytest.raises(ablate.AblationError, match=re.escape(message)):   # the runner's too
    ablate.resolve_config('configs/tiny.py', [override])   # (max-seq-len: its own pattern)


def test_a_home_path_after_an_equals_sign_is_the_home_directory(tmp_path, monkeypatch, capsys):
  """bash expands `--out_dir ~/x` but not `--out_dir=~/x`: hf_export, GLUE, aot and shards
  wrote into a folder named '~' under the current directory (GLUE then failed to take its
  lock under the real home), where the trainer's --workdir went to the home directory."""
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  assert cli.expand_home(['p', '--out_dir=~/x', '-out=~', '--config.data.vocab_path=~/v',
                          '--noconfig.a', '--tasks=rte']) == [
      'p', f'--out_dir={home}/x', f'-out={home}', '--config.data.vocab_path=~/v',
      '--noconfig.a', '--tasks=rte']   # config overrides expand theirs where they are used
  from bert_sym import shards  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit):
    shards.main(['finalize', '--out_dir=~/typo', '--split=train'])
  assert f'{home}/typo/train: nothing exported there' in capsys.readouterr().err
  (home / 'out').write_text('a file')
  result = subprocess.run([sys.executable, '-m', 'bert_sym.hf_export', '--checkpoint=unused',
                           '--out_dir=~/out'], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(cli.CHECKOUT)))
  assert f'error: --out_dir={home}/out is a file, not a directory.' in result.stderr, (
      result.stderr[-2000:])
  assert not (tmp_path / '~').exists()
