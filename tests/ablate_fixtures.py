"""One tiny ablation grid, trained once per test session, shared by the runner and notebook tests.

2 variants x 2 seeds of configs/tiny.py shrunk to a few steps (each run is the real
trainer in a subprocess: about 45 s of start-up and compilation on 2 CPU cores).
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
OVERRIDES = (
    f'--config.total_steps={TOTAL_STEPS}', '--config.eval_every_steps=2',
    '--config.log_every_steps=2', '--config.eval_steps=1',
    '--config.model.hidden_size=32', '--config.model.num_heads=2', '--config.model.mlp_dim=64',
    '--config.model.max_position_embeddings=64', '--config.data.max_seq_len=32',
    '--config.data.max_predictions_per_seq=5', '--config.batch_size=8',
    '--config.optimizer.warmup_steps=2', '--config.checkpoint.every_steps=3',
    '--config.checkpoint.async_save=False',
)


def ablate_command(workdir, *extra):
  return [sys.executable, '-m', 'bert_sym.ablate', f'--config={CONFIG}',
          f'--variants={",".join(VARIANTS)}', f'--seeds={",".join(map(str, SEEDS))}',
          f'--workdir={workdir}', *OVERRIDES, *extra]


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
