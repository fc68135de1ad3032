"""Helpers for the trainer tests: a tiny config, a synthetic MLM input with the data API.

`SyntheticMLMIterator` has the interface of `bert_sym.input.iterator.make_mlm_iterator`'s iterator
(dict of numpy [per_host_batch, max_seq_len]; get_state/set_state), so the trainer can be
tested without TensorFlow or a corpus. Batch n is a pure function of (seed, split, n,
process), which makes resume-exactness checks meaningful.

Run as a script it is the trainer's command line with the synthetic input plugged in:

  python -m tests.train_fixtures --config=configs/tiny.py --workdir=/tmp/w --synthetic ...
"""

import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Token ids laid out like BERT's WordPiece vocab: the specials live below 104.
PAD, CLS, SEP, MASK = 0, 101, 102, 103
FIRST_REGULAR = 104


class SyntheticMLMIterator:
  """Random sentences with BERT-style masking (15%; 80% [MASK], 10% random, 10% same).

  Tokens follow a simple learnable rule (each token is the previous one + 1, wrapping),
  so a model that trains shows a falling loss.
  """

  def __init__(self, data_config, *, batch_size, split, seed, start_step=0,
               process_index=None, process_count=None, vocab_size=1000):
    import jax  # pylint: disable=g-import-not-at-top
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.per_host_batch = batch_size   # as bert_sym.input.iterator: rows per process
    self.seq_len = data_config.max_seq_len
    self.max_predictions = data_config.max_predictions_per_seq
    self.mask_rate = data_config.mask_rate
    self.vocab_size = vocab_size
    self.seed = seed
    self.split_id = {'train': 0, 'validation': 1}[split]
    self.index = start_step
    # Test hook: this host's copy of the corpus is another one (a node-local export).
    self.corpus = os.environ.get('SYNTHETIC_CORPUS')

  def __iter__(self):
    return self

  def get_state(self):   # like the real iterator's, it names the corpus (when a test does)
    return {'index': self.index, **({'corpus': self.corpus} if self.corpus else {})}

  def set_state(self, state, fix=''):   # fix: the real iterator's error advice
    del fix
    self.index = int(state['index'])

  def __next__(self):
    # Test hooks: a slow input (so a test can kill the run mid-way) and a poisoned batch.
    if os.environ.get('SYNTHETIC_SLEEP_SECONDS'):
      time.sleep(float(os.environ['SYNTHETIC_SLEEP_SECONDS']))
    # A run held mid-way until the test creates this file (e.g. while a second starts): its
    # training batches from SYNTHETIC_WAIT_AT_BATCH on (default 2) wait for it.
    gate = os.environ.get('SYNTHETIC_WAIT_FOR_FILE')
    held_from = int(os.environ.get('SYNTHETIC_WAIT_AT_BATCH', '2'))
    while (gate and self.split_id == 0 and self.index >= held_from
           and not os.path.exists(gate)):
      time.sleep(0.05)
    poison = (self.split_id == 0 and
              str(self.index) == os.environ.get('SYNTHETIC_NAN_AT_BATCH'))
    # Like bert_sym.input.iterator: process p takes rows [p*B, (p+1)*B) of global batch k, and each
    # row depends on its global index only, so the global batch ignores the process count.
    first = (self.index * self.process_count + self.process_index) * self.per_host_batch
    self.index += 1
    rows = [self._row(first + r) for r in range(self.per_host_batch)]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    if poison:
      batch['mlm_weights'][0, :] = np.nan
    return batch

  def _row(self, global_index):
    rng = np.random.default_rng([self.seed, self.split_id, global_index])
    length, regular = self.seq_len, self.vocab_size - FIRST_REGULAR
    n_real = int(rng.integers(length // 2, length + 1))
    tokens = FIRST_REGULAR + (int(rng.integers(0, regular)) + np.arange(length)) % regular
    real = np.arange(length) < n_real
    tokens[0], tokens[n_real - 1] = CLS, SEP
    tokens = np.where(real, tokens, PAD).astype(np.int32)

    candidates = np.flatnonzero(real & (tokens >= FIRST_REGULAR))
    n = min(self.max_predictions, max(1, int(round(self.mask_rate * n_real))), len(candidates))
    chosen = np.sort(rng.choice(candidates, size=n, replace=False))
    input_ids, targets = tokens.copy(), np.zeros_like(tokens)
    weights = np.zeros(length, np.float32)
    targets[chosen], weights[chosen] = tokens[chosen], 1.0
    action = rng.random(n)
    input_ids[chosen[action < 0.8]] = MASK
    randomised = chosen[(action >= 0.8) & (action < 0.9)]
    input_ids[randomised] = rng.integers(FIRST_REGULAR, self.vocab_size, size=len(randomised))
    return dict(input_ids=input_ids, token_type_ids=np.zeros_like(tokens),
                attention_mask=real.astype(np.int32), mlm_targets=targets,
                mlm_weights=weights)


def make_synthetic_iterator(data_config, **kwargs):
  return SyntheticMLMIterator(data_config, **kwargs)


TINY = {
    'model.vocab_size': 1000, 'model.hidden_size': 32, 'model.num_heads': 2,
    'model.mlp_dim': 64, 'model.num_layers': 2, 'model.max_position_embeddings': 64,
    'data.max_seq_len': 32, 'data.max_predictions_per_seq': 6,
    'batch_size': 16, 'total_steps': 12, 'optimizer.warmup_steps': 3,
    'log_every_steps': 4, 'eval_every_steps': 6, 'eval_steps': 2,
    'checkpoint.every_steps': 4, 'checkpoint.keep_last': 2, 'checkpoint.keep_every': 0,
}


def tiny_overrides(**extra):
  """Command-line overrides that make configs/tiny.py a seconds-long synthetic run.

  Keys use '__' for '.', e.g. tiny_overrides(mesh__data=4).
  """
  flags = dict(TINY, **{k.replace('__', '.'): v for k, v in extra.items()})
  return [f'--config.{k}={v}' for k, v in flags.items()]


def tiny_config(**extra):
  """configs/tiny.py with the same overrides, as a ConfigDict (in-process tests)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.update_from_flattened_dict(
      dict(TINY, **{k.replace('__', '.'): v for k, v in extra.items()}))
  return config


def coordinator_address() -> str:
  """localhost:PORT for a test's jax.distributed coordinator, free when chosen. The port
  is drawn below the kernel's ephemeral range: one from bind(port 0) is in that range,
  where the gloo and gRPC connections of the tests running beside could take it in the
  seconds before the coordinator binds it."""
  try:
    with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
      ephemeral_start = int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    ephemeral_start = 32768   # Linux's default
  for _ in range(100) if ephemeral_start > 11000 else ():
    port = random.SystemRandom().randrange(10000, ephemeral_start)
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:
        continue
    return f'localhost:{port}'
  with socket.socket() as s:   # no room below the range: the kernel's choice
    s.bind(('localhost', 0))
    return f'localhost:{s.getsockname()[1]}'


def cpu_devices_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with `devices` simulated CPUs, keeping the session's flags
  (tests/conftest.py: fast unoptimised compiles)."""
  return (f"{os.environ.get('XLA_FLAGS', '')} "
          f'--xla_force_host_platform_device_count={devices}').strip()


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """`build(path)` once per test session, however many pytest-xdist workers ask: the first
  builds under a file lock, the others wait and share the result, which they must only
  read (copy it to change it). pytest-xdist's own recipe for session-wide fixtures; each
  worker building its own copy of a trained workdir cost a trainer run per worker."""
  from filelock import FileLock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent   # shared by the workers of this session
  path, done = root / name, root / f'{name}.done'
  with FileLock(str(root / f'{name}.lock')):
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      build(path)
      done.touch()
  return path


# configs/tiny.py shrunk further; bert-base-uncased vocabulary, as GLUE text needs it.
REAL_TINY = {
    'model.hidden_size': 32, 'model.num_heads': 2, 'model.mlp_dim': 64,
    'model.max_position_embeddings': 64, 'data.max_seq_len': 32,
    'data.max_predictions_per_seq': 5, 'batch_size': 8, 'total_steps': 4,
    'optimizer.warmup_steps': 1, 'log_every_steps': 2, 'eval_every_steps': 2, 'eval_steps': 1,
    'checkpoint.every_steps': 2, 'checkpoint.keep_last': 0, 'checkpoint.async_save': False,
}


def real_pretrained(tmp_path_factory) -> tuple[pathlib.Path, str]:
  """(workdir, the trainer's stdout) of REAL_TINY pre-trained by the trainer's own command
  line on the embedded corpus (the seqio task): 4 steps, saves 2 and 4. Once per session,
  read-only (copy it to change it): the GLUE tests fine-tune it and the real input
  pipeline's resume test continues it; each real-corpus run costs a TensorFlow import and
  the corpus' tokenisation (~20 s)."""
  def build(path):
    path.mkdir(parents=True)
    flags = [f'--config.{k}={v}' for k, v in REAL_TINY.items()]
    result = run_trainer(path / 'workdir', *flags, synthetic=False, timeout=600)
    (path / 'stdout.txt').write_text(result.stdout)
  path = built_once(tmp_path_factory, 'real_pretrained', build)
  return path / 'workdir', (path / 'stdout.txt').read_text()


def run_trainer(workdir, *extra_flags, devices=1, synthetic=True, config='configs/tiny.py',
                overrides=None, env=None, timeout=300, check=True, apply_tiny=True,
                **popen_kwargs):
  """Runs the trainer's command line in a subprocess with `devices` simulated CPUs."""
  cmd = [sys.executable, '-m', 'tests.train_fixtures' if synthetic else 'bert_sym.train',
         f'--config={config}']
  if workdir is not None:
    cmd.append(f'--workdir={workdir}')
  cmd += tiny_overrides(**(overrides or {})) if synthetic and apply_tiny else []
  cmd += list(extra_flags)
  full_env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu',
                  # With tests/conftest.py's unoptimised compiles: these runs are
                  # compile-bound.
                  XLA_FLAGS=cpu_devices_flags(devices),
                  TF_CPP_MIN_LOG_LEVEL='3')
  full_env.update(env or {})
  if popen_kwargs.pop('background', False):
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen_kwargs)
  result = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f'{" ".join(cmd)} failed ({result.returncode}):\n'
                         f'{result.stdout[-5000:]}\n{result.stderr[-8000:]}')
  return result


def _simulate_full_disk_at_step(step: str) -> None:
  """Test hook: creating step `step`'s directory (any step's for 'any') fails as on a full
  disk (ENOSPC), for machines where a small tmpfs cannot be mounted."""
  import errno  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  cls = type(epath.Path('/'))
  original = cls.mkdir

  def mkdir(self, *args, **kwargs):
    if (self.name.startswith(f'{step}.orbax-checkpoint-tmp') or
        (step == 'any' and '.orbax-checkpoint-tmp' in self.name)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return original(self, *args, **kwargs)
  cls.mkdir = mkdir


def _simulate_full_disk_on_one_process(process_and_step: str) -> None:
  """Test hook: on process P only, writing the arrays of step N ('P:N') fails with ENOSPC
  (a host whose local disk or quota ran out; the others write theirs)."""
  import errno  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  process, step = (int(x) for x in process_and_step.split(':'))
  original = serialization.async_serialize_from_host

  async def write(shards, tensorstore_spec, *args, **kwargs):
    if (jax.process_index() == process and
        f'/{step}.orbax-checkpoint-tmp' in str(tensorstore_spec)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f'step {step}')
    return await original(shards, tensorstore_spec, *args, **kwargs)
  serialization.async_serialize_from_host = write


def make_params_nonfinite(step_dir) -> None:
  """One parameter array of a checkpoint's state set to NaN, written by orbax itself."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from bert_sym import checkpoint  # pylint: disable=g-import-not-at-top
  state_dir = pathlib.Path(step_dir) / checkpoint.STATE
  state = ocp.StandardCheckpointer().restore(state_dir)
  leaves, tree = jax.tree.flatten(state['params'])
  leaves[0] = np.full_like(np.asarray(leaves[0]), np.nan)
  state['params'] = jax.tree.unflatten(tree, leaves)
  shutil.rmtree(state_dir)
  with ocp.StandardCheckpointer() as writer:
    writer.save(state_dir, state)


if __name__ == '__main__':
  from bert_sym import cli  # pylint: disable=g-import-not-at-top
  from bert_sym import train  # pylint: disable=g-import-not-at-top
  if os.environ.get('SYNTHETIC_NO_SPACE_AT_STEP'):
    _simulate_full_disk_at_step(os.environ['SYNTHETIC_NO_SPACE_AT_STEP'])
  if os.environ.get('SYNTHETIC_NO_SPACE_ON_PROCESS_AT_STEP'):
    _simulate_full_disk_on_one_process(os.environ['SYNTHETIC_NO_SPACE_ON_PROCESS_AT_STEP'])
  make_iterator = make_synthetic_iterator
  if os.environ.get('SYNTHETIC_CTRL_C_AT_START'):   # while waiting for the other processes
    from bert_sym import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize = lambda cli_flags: signal.raise_signal(signal.SIGINT)
  if os.environ.get('REAL_INPUT_WAIT_FOR_FILE'):   # the real pipeline, held (a test kills it)
    # Its training batches from REAL_INPUT_WAIT_AT_BATCH on wait for the file, as the
    # synthetic ones do for SYNTHETIC_WAIT_FOR_FILE: a run slowed by a sleep instead ran to
    # its end while a starved test process waited to kill it.
    from bert_sym.input import iterator  # pylint: disable=g-import-not-at-top
    make_iterator, take = None, iterator.MLMIterator.__next__
    gate, held_from = (os.environ['REAL_INPUT_WAIT_FOR_FILE'],
                       int(os.environ.get('REAL_INPUT_WAIT_AT_BATCH', '2')))

    def held_next(self):
      while (self._shuffle and self._step >= held_from   # pylint: disable=protected-access
             and not os.path.exists(gate)):
        time.sleep(0.05)
      return take(self)
    iterator.MLMIterator.__next__ = held_next
  cli.run(lambda argv: train.main(argv, make_iterator=make_iterator),
          prog='bert_sym.train', flags_parser=train.parse_flags)
