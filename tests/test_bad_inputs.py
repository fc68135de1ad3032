"""Every entry point answers a bad input with one `prog: error: ...` line and exit 1.

A table of bad flags, paths, files, configs and damaged shards is walked through
`python -m bert_sym.train | glue | export | ablate | streaming`, each entry point in one
subprocess that runs its real `__main__` block once per case (tests/bad_inputs_driver.py:
TF and JAX are imported once per entry point). Any traceback fails the test (a traceback
means a bug); so does a trainer case that leaves its workdir behind. `--help` exits 0.
Run with -s to see the table (input, exit code, seconds, message).
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.test_streaming import write_corpus
from tests.train_fixtures import REPO_ROOT

TASK = 'synthetic_test'
LENGTH = 32


def drive_cases(module, cases, tmp_path):
  """Runs each (argv, expected) of `cases` through `module`'s __main__, in one process."""
  cases_file = tmp_path / f'{module}.cases.json'
  cases_file.write_text(json.dumps([argv for argv, _ in cases]))
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run([sys.executable, '-m', 'tests.bad_inputs_driver', module,
                           str(cases_file)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def one_line_failures(module, cases, results, table):
  """What in `results` is not the one `module: error: EXPECTED` line (or --help's exit 0)."""
  prog = module
  failures = []
  for (argv, expected), got in zip(cases, results):
    lines = [l for l in got['stderr'].splitlines() if l.strip()]
    message = lines[-1] if lines else ''
    table.append((f'{prog} {" ".join(argv)}', got['code'], got['seconds'],
                  message if expected else f'(help, {len(got["stdout"].splitlines())} lines)'))
    if 'Traceback' in got['stderr']:
      failures.append(f'{argv}: traceback\n{got["stderr"][-2000:]}')
    elif expected is None:   # --help
      if got['code'] != 0 or not got['stdout'].strip():
        failures.append(f'{argv}: --help exited {got["code"]}')
    elif got['code'] != 1 or len(lines) != 1 or not message.startswith(f'{prog}: error: '):
      failures.append(f'{argv}: exit {got["code"]}, stderr:\n{got["stderr"][-2000:]}')
    elif expected not in message:
      failures.append(f'{argv}: {expected!r} not in {message!r}')
  return failures


# ---- Fixtures: a pristine shard corpus, each kind of damage, a mismatched checkpoint ----

def _damage(root: pathlib.Path, kind: str) -> str:
  """Damages shard 0 of root's train split; returns its file name."""
  split = root / 'train'
  metadata = json.loads((split / 'metadata.json').read_text())
  name = metadata['shards'][0]['file']
  path = split / name
  if kind == 'truncated':
    os.truncate(path, path.stat().st_size - 100)
  elif kind == 'missing':
    path.unlink()
  elif kind == 'resized':
    np.save(path, np.zeros((3, LENGTH), np.uint16))
  elif kind == 'garbage_header':
    with open(path, 'r+b') as f:
      f.write(os.urandom(64))
  elif kind == 'out_of_vocab':
    array = np.load(path, mmap_mode='r+')
    array[0, 5] = 65535
    array.flush()
  elif kind == 'other_vocab':   # consistent with its own vocab.txt, not the config's
    for split_dir in (root / 'train', root / 'validation'):
      vocab = (split_dir / 'vocab.txt').read_bytes().replace(b'\nthe\n', b'\nteh\n', 1)
      (split_dir / 'vocab.txt').write_bytes(vocab)
      meta = json.loads((split_dir / 'metadata.json').read_text())
      meta['vocab_md5'] = hashlib.md5(vocab).hexdigest()
      (split_dir / 'metadata.json').write_text(json.dumps(meta))
  return name


DAMAGE = {   # kind -> what the one line must say
    'truncated': 'truncated', 'missing': 'is missing', 'resized': 'array (3, 32)',
    'garbage_header': 'not a .npy shard', 'out_of_vocab': 'block 0 holds token id 65535',
    'other_vocab': 'exported with vocabulary md5',
}


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpora')
  write_corpus(str(root / 'pristine'), 64, LENGTH, num_parts=2, blocks_per_shard=16)
  for kind in DAMAGE:
    shutil.copytree(root / 'pristine', root / kind)
    _damage(root / kind, kind)
  return root


@pytest.fixture(scope='module')
def mismatched_checkpoint(tmp_path_factory):
  """A workdir whose checkpoint has hidden 32 under a config.json that says hidden 64."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bert_sym import checkpoint  # pylint: disable=g-import-not-at-top
  from bert_sym import model as model_lib  # pylint: disable=g-import-not-at-top
  from tests.train_fixtures import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('mismatch')
  config = tiny_config()
  params = nn.meta.unbox(model_lib.BertForMaskedLM(config.model).init(
      jax.random.key(0), *model_lib.dummy_inputs(1, 8))['params'])
  manager = checkpoint.make_manager(workdir)
  checkpoint.save(manager, 1, {'params': params}, {}, force=True)
  manager.wait_until_finished()
  manager.close()
  config.model.hidden_size, config.model.mlp_dim = 64, 128
  checkpoint.write_config(workdir, config)
  return workdir


# ---- The table ----

def _shards(source, root):
  return ['--config=configs/tiny.py', f'--config.data.source={source}',
          f'--config.data.shards_dir={root}', f'--config.data.task={TASK}',
          f'--config.data.max_seq_len={LENGTH}', '--config.data.max_predictions_per_seq=5',
          '--config.model.vocab_size=30522', '--config.batch_size=8']


def _train_cases(tmp, corpora):
  not_utf8 = tmp / 'latin1.txt'
  not_utf8.write_bytes('caf\xe9 au lait, a line of text\n'.encode('latin-1'))
  tiny = ['--config=configs/tiny.py']
  cases = [
      (['--config=configs/nonexistent.py'], 'cannot be loaded'),
      (tiny + ['--config.model.attention_impl=cudnn'], "needs a GPU but the JAX backend is 'cpu'"),
      (tiny + ['--config.data.max_seq_len=2'], 'max_seq_len=2'),
      (tiny + ['--config.data.max_predictions_per_seq=1000'], 'maskable positions'),
      (tiny + ['--config.mesh.data=4'], 'has 4 devices but JAX sees 1'),
      (tiny + ['--config.batch_size=0'], 'batch_size=0'),
      (tiny + ['--config.no_such_key=1'], "unknown config key 'no_such_key'"),
      (tiny + ['--config.model.atention=standard'],
       "unknown config key 'atention' in --config.model.atention=standard. Fix: did you mean "
       "'attention'?"),
      (tiny + ['--config.model.attention=bogus'], "config.model.attention='bogus'"),
      # A key looked up inside a value: a TypeError traceback, or "unknown key 'Attribute'".
      (tiny + ['--config.model.attention.impl=cudnn'],
       "config.model.attention is a value ('pairwise'"),
      (tiny + ['--config.model.remat.policy=dots'], 'config.model.remat is a value'),
      # absl kept the last: a launcher's own --config lost to the user's, silently.
      (tiny + ['--config=configs/sym_small.py'], '--config is given 2 times'),
      (['--config=configs/sym_base.py'], 'shards_dir is not set'),
      (_shards('shards', corpora / 'pristine') + ['--config.model.vocab_size=1000'],
       '--config.model.vocab_size=30522'),
      (_shards('streaming', corpora / 'absent'), 'metadata.json cannot be read'),
      (_shards('streaming', corpora / 'pristine') + [f'--config.data.text_files={tmp}/*.txt'],
       'so the files would be ignored'),   # were, on shards of another task
  ]
  for source in ('shards', 'streaming'):
    cases += [(_shards(source, corpora / kind), DAMAGE[kind]) for kind in DAMAGE]
  cases += [   # last: these import TensorFlow
      (tiny + ['--config.data.task=bert_sym_mlm_text_files',
               f'--config.data.text_files={tmp}/absent*.txt'],
       'matches nothing). Fix: correct the path or glob (config.data.text_files'),
      (tiny + [f'--config.data.vocab_path={tmp}/absent/vocab.txt'],
       'vocab.txt\'). Fix: point vocab_path (config.data.vocab_path'),
      (tiny + ['--config.data.task=bert_sym_mlm_text_files',
               f'--config.data.text_files={not_utf8}'], 'is not valid UTF-8'),
  ]
  cases = [(argv + [f'--workdir={tmp}/run{i}'], expected) for i, (argv, expected) in
           enumerate(cases)]
  return cases + [(['--config=configs/tiny.py'], '--workdir is required'),
                  (['--config=configs/tiny.py', f'--checkpoint={tmp}/run'],   # GLUE's flag
                   'Fix: --workdir (the run\'s directory, resumed if it exists)'),
                  (['--help'], None)]


def test_every_entry_point_answers_bad_input_in_one_line(tmp_path, corpora,
                                                          mismatched_checkpoint):
  table, failures = [], []
  out = tmp_path / 'out'
  ckpt = str(mismatched_checkpoint)
  # Its config.json edited by hand (as the README says to, for vocab_path), with a typo.
  misspelled = tmp_path / 'misspelled'
  shutil.copytree(ckpt, misspelled)
  config_json = json.loads((misspelled / 'config.json').read_text())
  config_json['model']['attention'] = 'Pairwise'
  (misspelled / 'config.json').write_text(json.dumps(config_json))
  # Damaged from outside (the trainer writes it whole): the README's "one line naming it".
  truncated = tmp_path / 'truncated'
  shutil.copytree(ckpt, truncated)
  (truncated / 'config.json').write_text((truncated / 'config.json').read_text()[:200])
  train = _train_cases(tmp_path, corpora)
  plans = {
      'bert_sym.train': train,
      'bert_sym.hf_export': [
          ([f'--checkpoint={tmp_path}/absent', f'--out_dir={out}'],
           'absent does not exist. Fix: pass a training workdir'),
          ([f'--checkpoint={ckpt}', f'--out_dir={out}'],
           "does not match its config.json in"),
          ([f'--checkpoint={misspelled}', f'--out_dir={out}'],
           "config.model.attention='Pairwise' is not one of"),
          ([f'--out_dir={out}'], '--checkpoint'),
          ([f'--checkpoint={truncated}', f'--out_dir={out}'], 'config.json is not valid JSON'),
          ([f'--checkpoint={ckpt}', f'--output_dir={out}'],   # GLUE's flag: absl guessed
           '--output_dir is a flag of another bert_sym command. Fix: --out_dir'),   # --log_dir
          (['--help'], None)],
      'bert_sym.glue': [
          ([f'--checkpoint={tmp_path}/absent', f'--output_dir={out}', '--tasks=rte'],
           'absent does not exist. Fix: pass a training workdir'),
          ([f'--output_dir={out}'], '--checkpoint and --output_dir are required'),
          ([f'--checkpoint={truncated}', f'--output_dir={out}', '--tasks=rte'],
           'config.json is not valid JSON'),
          ([f'--checkpoint={ckpt}', '--output_dir= '], '--checkpoint and --output_dir are '
           'required'),   # a blank name: no folder ' ' written
          ([f'--workdir={ckpt}', f'--output_dir={out}'], '--workdir is a flag of another '
           'bert_sym command. Fix: --checkpoint (the training workdir to read) or --output_dir'),
          (['--config=configs/nonexistent.py', f'--checkpoint={ckpt}', f'--output_dir={out}'],
           'cannot be loaded'),
          (['--help'], None)],
      'bert_sym.ablate': [
          (['--config=configs/nonexistent.py', f'--workdir={out}'], 'nonexistent.py'),
          (['--config=configs/tiny.py'], '--workdir is required'),
          (['--config=configs/tiny.py', f'--workdir={out}', '--config.no_such_key=1'],
           'no_such_key'),
          (['--config=configs/tiny.py', f'--workdir={out}', '--config.seed'],
           'Write overrides as --config.KEY=VALUE'),
          (['--config=configs/tiny.py', '--config=configs/sym_small.py', f'--workdir={out}'],
           '--config is given twice'),   # the last one won, silently
          (['--help'], None)],
      'bert_sym.shards': [
          ([], 'required: command'),
          (['export', '--task=nope', f'--out_dir={out}'], "--task='nope' is not"),
          (['export', '--task=bert_sym_mlm_embedded', '--max_seq_len=1000',
            f'--out_dir={out}'], 'max_seq_len=1000'),
          (['export', '--task=bert_sym_mlm_text_files', f'--out_dir={out}'],
           'needs --text_files'),
          (['export', '--task=bert_sym_mlm_text_files', f'--text_files={tmp_path}/no*.txt',
            f'--out_dir={out}'], "matches nothing). Fix: correct the path or glob"),
          (['export', '--task=bert_sym_mlm_c4', f'--tfds_data_dir={tmp_path}/empty_tfds',
            '--split=train', f'--out_dir={out}'], 'tfds build c4/en'),
          (['--help'], None), (['export', '--help'], None)],
  }
  results = {module: drive_cases(module, cases, tmp_path) for module, cases in plans.items()}
  for module, cases in plans.items():
    failures += one_line_failures(module, cases, results[module], table)
  width = max(len(row[0]) for row in table)
  print('\n' + '\n'.join(f'{cmd[:110]:<{min(width, 110)}} | {code} | {secs:5.2f} s | {msg}'
                         for cmd, code, secs, msg in table))
  assert not failures, '\n\n'.join(failures)
  # Nothing is left behind: no workdir for a refused run, no export for a refused model.
  left = [argv for argv, _ in train for a in argv if a.startswith('--workdir=')
          and pathlib.Path(a.split('=', 1)[1]).exists()]
  assert not left, left
  assert not out.exists()
  # hf_export added its own 'Fix: --checkpoint=...' to the reader's line, which already
  # ended on one: `... Fix: pass a training workdir ... Fix: --checkpoint=WORKDIR ...`.
  [absent] = [line for line in results['bert_sym.hf_export'][0]['stderr'].splitlines()
              if line.strip()]
  assert 'absent does not exist. Fix: pass a training workdir' in absent, absent
  assert absent.count('Fix:') == 1, absent


def test_config_paths_work_from_any_directory(tmp_path):
  """The README: after `source .venv/bin/activate`, every command works from any
  directory. `--config=configs/...` then means the checkout's configs/, and the config
  files' own `from configs import common` must import. The package is put on the path
  the way an install does, without the checkout root (which would hide the problem)."""
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'bert_sym').symlink_to(pathlib.Path(REPO_ROOT) / 'bert_sym')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=elsewhere, env=env,
                                     capture_output=True, text=True, timeout=300)
  for config in ('configs/tiny.py', f'{REPO_ROOT}/configs/sym_base.py:fast'):
    result = run('bert_sym.train', f'--config={config}', '--dry_run')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'FLOPs per step' in result.stdout
  result = run('bert_sym.train', '--config=configs/missing.py', '--dry_run')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert "No such file or directory: 'configs/missing.py'" in result.stderr
  assert f'else to the checkout {REPO_ROOT}' in result.stderr
  assert not list(elsewhere.iterdir())   # a dry run writes nothing
