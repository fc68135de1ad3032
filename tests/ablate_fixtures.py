"""One tiny ablation grid, trained once per test process (its tests share one xdist group),
shared by the runner and notebook tests.

2 variants x 2 seeds of configs/tiny.py shrunk to a few steps (each run is the real
trainer in a subprocess), reading a synthetic corpus in the export's shard format
(source=streaming, no TensorFlow). The runner passes the input config to its trainers as
any other override; on the default seqio input each trainer also imported TensorFlow and
seqio and packed the embedded corpus: the grid took 72 s of CPU time, not 29 s. The trainer's
seqio input is tested in tests/test_train.py (test_real_input_pipeline_trains_and_resumes).
"""

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = 'configs/tiny.py'
VARIANTS = ('standard', 'pairwise')
SEEDS = (1, 2)
TOTAL_STEPS = 6
_SIZES = (
    f'--config.total_steps={TOTAL_STEPS}', '--config.eval_every_steps=2',
    '--config.log_every_steps=2', '--config.eval_steps=1',
    '--config.model.hidden_size=32', '--config.model.num_heads=2', '--config.model.mlp_dim=64',
    '--config.model.max_position_embeddings=64', '--config.data.max_seq_len=32',
    '--config.data.max_predictions_per_seq=5', '--config.batch_size=8',
    '--config.optimizer.warmup_steps=2', '--config.checkpoint.every_steps=3',
    '--config.checkpoint.async_save=False',
)
CORPUS_TASK = 'synthetic_ablate'


def _zipf_ids(rng, shape):
  """Ids drawn as words in text (Zipf's law over 1000 ids), so that the loss falls within
  the grid's few steps: on uniform ids (a loss of log 30522 from the start) the curves had
  nothing to learn, and the steps-to-target checks no crossing after step 0."""
  return 1000 + (rng.zipf(1.2, shape) - 1) % 1000


@functools.lru_cache(maxsize=None)
def overrides() -> tuple[str, ...]:
  """The grid's --config overrides: a few tiny steps on a corpus written once per process."""
  from tests import test_streaming  # pylint: disable=g-import-not-at-top
  corpus = os.path.join(_temporary_dir('ablate_corpus_'), 'corpus')
  test_streaming.write_corpus(corpus, 64, 32, num_parts=1, task=CORPUS_TASK,
                              draw_ids=_zipf_ids)
  return _SIZES + ('--config.data.source=streaming', f'--config.data.task={CORPUS_TASK}',
                   f'--config.data.shards_dir={corpus}')


def ablate_command(workdir, *extra):
  return [sys.executable, '-m', 'bert_sym.ablate', f'--config={CONFIG}',
          f'--variants={",".join(VARIANTS)}', f'--seeds={",".join(map(str, SEEDS))}',
          f'--workdir={workdir}', *overrides(), *extra]


def _temporary_dir(prefix: str) -> str:
  """A directory removed when the test process exits (a grid is about 90 MB of
  checkpoints: left behind, every suite run would add one to /tmp)."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


@functools.lru_cache(maxsize=None)
def tiny_grid() -> tuple[str, str]:
  """(workdir, runner output) of the tiny grid, trained through the runner's command line."""
  workdir = os.path.join(_temporary_dir('ablate_grid_'), 'abl')
  proc = subprocess.run(ablate_command(workdir), cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=900)
  if proc.returncode != 0:
    raise AssertionError(f'bert_sym.ablate failed ({proc.returncode}):\n{proc.stdout[-5000:]}'
                         f'\n{proc.stderr[-5000:]}')
  return workdir, proc.stdout


# A GLUE directory with one task (RTE, the download script's layout and header), small
# enough that fine-tuning a tiny checkpoint on it takes seconds: the runner's GLUE path
# runs in CI without the real data.
_RTE_ROWS = (
    ('The cat sat on the mat all afternoon.', 'A cat was on the mat.', 'entailment'),
    ('The museum opened a new wing in 1998.', 'The museum closed in 1998.', 'not_entailment'),
    ('Rain fell over the valley for three days.', 'It rained in the valley.', 'entailment'),
    ('She sold her bicycle to a neighbour.', 'She bought a car.', 'not_entailment'),
    ('The river floods every spring.', 'The river sometimes floods.', 'entailment'),
    ('He wrote two novels before he was thirty.', 'He never wrote a book.', 'not_entailment'),
    ('The team won the final match.', 'The team played a match.', 'entailment'),
    ('Bread is baked in the morning.', 'The bakery has no oven.', 'not_entailment'),
)


def tiny_glue_dir() -> str:
  """A GLUE directory holding RTE/train.tsv and RTE/dev.tsv (8 rows each)."""
  root = _temporary_dir('tiny_glue_')
  os.makedirs(os.path.join(root, 'RTE'))
  for name in ('train.tsv', 'dev.tsv'):
    with open(os.path.join(root, 'RTE', name), 'w') as f:
      f.write('index\tsentence1\tsentence2\tlabel\n')
      for i, row in enumerate(_RTE_ROWS):
        f.write('\t'.join((str(i),) + row) + '\n')
  return root
