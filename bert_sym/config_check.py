"""Checks a whole training config before anything is written or compiled.

A bad value (a typo in an enum, a negative step count, text files named without the
text-files task) used to surface tens of seconds later as a raw KeyError or a traceback,
after the workdir, metrics.jsonl and tensorboard/ had been created. `check(config)` runs
first, in well under a second, and raises `ConfigError` with one line that names the key,
the value, what is allowed and the fix. It imports nothing heavy (no TensorFlow, no
model), so it also guards `--dry_run` and the launchers.
"""

import math
import os
import re
from typing import Any, Iterable

from absl import flags
import ml_collections
from ml_collections import config_flags

from bert_sym import attention
from bert_sym import cli
from bert_sym import kernel_choice
from bert_sym.cli import UserError
from bert_sym.input import MAX_SEQ_LEN, sources
from bert_sym.input.sources import TEXT_FILES_TASK

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
DATA_SOURCES = ('seqio', 'shards', 'streaming')   # streaming: bert_sym/input/shard_reader.py
ON_NONFINITE = ('stop', 'skip')
PAIR_TRUNCATIONS = ('hf', 'bert')   # GLUE's, by glue.data.truncate_longest_first
PRNG_IMPLS = ('threefry', 'rbg', 'unsafe_rbg')   # bert_sym.steps.PRNG_IMPLS (no jax import here)
REMAT_POLICIES = ('full', 'dots')                 # bert_sym.model.REMAT_POLICIES


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message is one line with the fix."""


def _choice(key: str, value: Any, allowed: Iterable[str]) -> None:
  if value not in (allowed := tuple(allowed)):
    raise ConfigError(
        f'config.{key}={value!r} is not one of: {", ".join(allowed)}. '
        f'Fix: --config.{key}={allowed[0]} (or another of those).')


def _positive(key: str, value: Any, *, allow_zero: bool = False) -> None:
  low = 0 if allow_zero else 1
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ConfigError(f'config.{key}={value!r} must be an integer >= {low}. '
                      f'Fix: --config.{key}=<integer >= {low}>.')


def _fraction(key: str, value: Any, *, low_open=True, high_open=True) -> None:
  ok = isinstance(value, (int, float)) and (0 < value if low_open else 0 <= value) and (
      value < 1 if high_open else value <= 1)
  if not ok:
    interval = f'{"(" if low_open else "["}0, 1{")" if high_open else "]"}'
    raise ConfigError(f'config.{key}={value!r} must lie in {interval}. '
                      f'Fix: --config.{key}=<value in {interval}>.')


def check_model(model: ml_collections.ConfigDict, prefix: str = 'model') -> None:
  _choice(f'{prefix}.attention', model.attention, attention.VARIANTS)
  _choice(f'{prefix}.attention_impl', model.attention_impl, kernel_choice.IMPLEMENTATIONS)
  _choice(f'{prefix}.dtype', model.dtype, DTYPES)
  _choice(f'{prefix}.remat_policy', model.get('remat_policy', 'full'), REMAT_POLICIES)
  for key in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim',
              'max_position_embeddings', 'type_vocab_size'):
    _positive(f'{prefix}.{key}', model[key])
  if model.hidden_size % model.num_heads:
    raise ConfigError(
        f'config.{prefix}.hidden_size={model.hidden_size} is not divisible by '
        f'config.{prefix}.num_heads={model.num_heads}. Fix: pick num_heads dividing it.')
  _fraction(f'{prefix}.dropout_rate', model.dropout_rate, low_open=False)
  _fraction(f'{prefix}.attention_dropout_rate', model.attention_dropout_rate,
            low_open=False)


def check_data(data: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  _choice('data.source', data.source, DATA_SOURCES)
  if data.source == 'shards' and not data.shards_dir:
    raise ConfigError("config.data.source='shards' needs the exported shards. Fix: "
                      '--config.data.shards_dir=DIR (from `python -m bert_sym.shards export`).')
  if data.source == 'shards' and '://' in data.shards_dir:
    raise ConfigError(
        f"config.data.source='shards' memory-maps a local directory, but "
        f'config.data.shards_dir={data.shards_dir!r} is a URL. Fix: '
        '--config.data.source=streaming (reads the same shards from gs:// and other URLs), '
        'or copy the shards to a local disk.')
  for key in ('text_files', 'validation_files'):   # every source: its shards record them
    if data.get(key) and data.task != TEXT_FILES_TASK:
      raise ConfigError(f'config.data.{key} is set but config.data.task={data.task!r}, so the '
                        f'files would be ignored. Fix: add --config.data.task={TEXT_FILES_TASK}.')
  if data.shards_dir and data.source == 'seqio':   # only 'shards' and 'streaming' read them
    raise ConfigError("config.data.shards_dir is set but config.data.source='seqio', so the "
                      'shards would be ignored. Fix: add --config.data.source=shards (local) '
                      'or --config.data.source=streaming (local or gs://).')
  if data.source == 'seqio':
    if not data.task:
      raise ConfigError('config.data.task is empty. Fix: --config.data.task=bert_sym_mlm_embedded '
                        '(or another task of bert_sym/input/seqio_tasks.py).')
    if data.task == TEXT_FILES_TASK and not data.text_files:
      raise ConfigError(f'config.data.task={TEXT_FILES_TASK!r} needs files. Fix: '
                        "--config.data.text_files='/data/*.txt' (comma-separated globs).")
  _positive('data.max_seq_len', data.max_seq_len)
  if data.max_seq_len < 3:
    raise ConfigError(
        f'config.data.max_seq_len={data.max_seq_len} leaves no token between [CLS] and '
        '[SEP]. Fix: --config.data.max_seq_len=64 (or more).')
  if data.max_seq_len > MAX_SEQ_LEN:
    raise ConfigError(
        f'config.data.max_seq_len={data.max_seq_len} exceeds {MAX_SEQ_LEN}, the longest '
        'block the input pipeline packs and masks (BERT\'s; whatever the model\'s '
        f'max_position_embeddings). Fix: --config.data.max_seq_len={MAX_SEQ_LEN} or less.')
  if data.max_seq_len > model.max_position_embeddings:
    raise ConfigError(
        f'config.data.max_seq_len={data.max_seq_len} exceeds '
        f'config.model.max_position_embeddings={model.max_position_embeddings}. '
        f'Fix: --config.data.max_seq_len={model.max_position_embeddings} or less.')
  _fraction('data.mask_rate', data.mask_rate)
  _positive('data.max_predictions_per_seq', data.max_predictions_per_seq)
  maskable = data.max_seq_len - 2   # [CLS] and [SEP] are never masked
  if data.max_predictions_per_seq > maskable:
    suggested = min(maskable, math.ceil(data.max_seq_len * data.mask_rate))
    raise ConfigError(
        f'config.data.max_predictions_per_seq={data.max_predictions_per_seq} exceeds the '
        f'{maskable} maskable positions of a {data.max_seq_len}-token sequence (the sparse '
        f'MLM head would compute that many predictions per row). Fix: '
        f'--config.data.max_predictions_per_seq={max(suggested, 1)} (mask_rate x '
        'max_seq_len, rounded up).')
  # Masking takes min(max_predictions_per_seq, max(1, round(mask_rate x tokens))) per row
  # (bert_sym/input/masking.py): a smaller cap would silently mask less than mask_rate.
  wanted = min(maskable, max(1, round(data.mask_rate * data.max_seq_len)))
  if data.max_predictions_per_seq < wanted:
    raise ConfigError(
        f'config.data.mask_rate={data.mask_rate} asks for {wanted} masked tokens in a full '
        f'{data.max_seq_len}-token row, but config.data.max_predictions_per_seq='
        f'{data.max_predictions_per_seq} caps them at {data.max_predictions_per_seq} '
        f'({data.max_predictions_per_seq / data.max_seq_len:.0%} of the row). Fix: '
        f'--config.data.max_predictions_per_seq={wanted}, or a lower mask_rate.')


def _not_negative(key: str, value: Any) -> None:   # (inf: weight decay made every weight NaN)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
    raise ConfigError(f'config.{key}={value!r} must be a finite number >= 0. '
                      f'Fix: --config.{key}=<number >= 0>.')


def _check_kind(config, needs: str, command: str, other: str) -> None:
  """A config file of the other command (GLUE's given to the trainer, or the reverse)."""
  if needs not in config:
    raise ConfigError(
        f'this config has no {needs!r}: it is not a {command} config (its keys: '
        f'{", ".join(sorted(config.keys())[:6])}, ...). Fix: --config={other}, or run the '
        'command this config is for.')


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first value of a training config that cannot work."""
  _check_kind(config, 'model', 'training', 'configs/tiny.py (or sym_base.py, ...)')
  _check_kind(config, 'data', 'training', 'configs/tiny.py (or sym_base.py, ...)')
  check_model(config.model)
  check_data(config.data, config.model)
  for key in ('batch_size', 'total_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint.every_steps'):
    _positive(key, config[key])
  for key in ('eval_steps', 'checkpoint.keep_last', 'checkpoint.keep_every'):
    _positive(key, config[key], allow_zero=True)   # 0: no evals, keep all, none kept forever
  _positive('checkpoint.save_timeout_s', config.checkpoint.get('save_timeout_s', 600))
  _choice('on_nonfinite', config.on_nonfinite, ON_NONFINITE)
  _choice('prng_impl', config.get('prng_impl', 'threefry'), PRNG_IMPLS)
  opt = config.optimizer
  _positive('optimizer.grad_accum_steps', opt.grad_accum_steps)
  _positive('optimizer.warmup_steps', opt.warmup_steps, allow_zero=True)
  if config.batch_size % opt.grad_accum_steps:
    raise ConfigError(
        f'config.batch_size={config.batch_size} is not divisible by '
        f'config.optimizer.grad_accum_steps={opt.grad_accum_steps}. Fix: pick a divisor.')
  for key, paper in (('learning_rate', 1e-4), ('eps', 1e-12)):   # eps 0: NaN in unseen rows
    if isinstance(opt[key], bool) or not isinstance(opt[key], (int, float)) or not (
        0 < opt[key] < math.inf):   # nan and inf too: the first update made every weight NaN
      raise ConfigError(f'config.optimizer.{key}={opt[key]!r} must be > 0 (the paper: '
                        f'{paper}) and finite. Fix: --config.optimizer.{key}={paper}.')
  for key in ('optimizer.weight_decay', 'optimizer.grad_clip_norm', 'peak_flops_per_device',
              'compilation_cache_max_gb'):   # 0: clipping off, the device's peak, no limit
    _not_negative(key, config.get(key, 0))
  _fraction('optimizer.b1', opt.b1, low_open=False)   # Adam's decay rates: 1 never moves
  _fraction('optimizer.b2', opt.b2, low_open=False)
  for axis in ('data', 'fsdp', 'tensor'):
    size = config.mesh[axis]
    if not isinstance(size, int) or not (size == -1 or size >= 1):
      raise ConfigError(f'config.mesh.{axis}={size!r} must be -1 (the devices left) or a '
                        f'positive integer. Fix: --config.mesh.{axis}=-1.')


def check_glue(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first value of a GLUE config (configs/glue.py) that cannot
  work: before any output is written, not at the first compile or as a silent no-op."""
  _check_kind(config, 'tasks', 'GLUE', 'configs/glue.py (or configs/glue.py:runlocal)')
  for key in ('batch_size', 'eval_batch_size', 'grad_accum_steps', 'log_every_steps',
              'max_consecutive_nonfinite'):
    _positive(key, config.get(key, 1))
  for key in ('max_train_examples', 'max_eval_examples', 'checkpoint_every_steps'):
    _positive(key, config[key], allow_zero=True)
  if config.batch_size % config.get('grad_accum_steps', 1):
    raise ConfigError(
        f'config.batch_size={config.batch_size} is not divisible by '
        f'config.grad_accum_steps={config.grad_accum_steps}. Fix: pick a divisor.')
  if config.max_seq_len < 8 or not isinstance(config.max_seq_len, int):
    raise ConfigError(f'config.max_seq_len={config.max_seq_len!r} cannot hold a sentence '
                      'pair. Fix: --config.max_seq_len=128 (the paper\'s).')
  for key in ('epochs', 'learning_rate', 'eps'):   # inf: a traceback (epochs), NaN weights
    if not isinstance(config[key], (int, float)) or not 0 < config[key] < math.inf:
      raise ConfigError(f'config.{key}={config[key]!r} must be > 0 and finite. Fix: '
                        f'--config.{key}=<number > 0> (configs/glue.py has the paper\'s).')
  _fraction('warmup_ratio', config.warmup_ratio, low_open=False, high_open=False)
  _fraction('b1', config.b1, low_open=False)
  _fraction('b2', config.b2, low_open=False)
  for key in ('weight_decay', 'grad_clip_norm', 'peak_flops_per_device'):   # MFU < 0
    _not_negative(key, config.get(key, 0))
  for key, allowed in (('on_nonfinite', ON_NONFINITE), ('pair_truncation', PAIR_TRUNCATIONS)):
    _choice(key, config.get(key, allowed[0]), allowed)
  for key in [k for k in ('dropout_rate', 'attention_dropout_rate') if k in config]:
    _fraction(key, config[key], low_open=False)


def check_data_named(config: ml_collections.ConfigDict) -> None:
  """Exported shards are named: without config.data.shards_dir the trainer stops as it
  starts. `check` lets it pass (bert_sym.aot compiles such configs to size a slice);
  launch/tpu_vm.sh asks for it (aot --require_data) before it creates a slice."""
  if config.data.source in ('shards', 'streaming') and not config.data.shards_dir:
    from bert_sym.input import shard_reader  # pylint: disable=import-outside-toplevel
    raise ConfigError(shard_reader.missing_shards_dir(config.data))


# ---- Pre-flight: everything a run needs, checked before the workdir is created ----

def preflight(config: ml_collections.ConfigDict, *, data: bool = True
              ) -> ml_collections.ConfigDict:
  """The trainer's checks before any side effect; returns the config to run.

  Values (`check`), then what depends on this machine (attention kernel vs backend, mesh
  vs devices, batch vs mesh), then the data (`data=False` when the caller brings its own
  iterator): both splits opened and verified (shards: every file's size and header; text:
  packed once, cached for the trainer), the vocabulary against the model's. Raises a
  `UserError` (one line with the fix) on the first problem; writes nothing. The returned
  copy holds absolute data paths, so its config.json reruns from any directory.
  """
  check(config)
  config = absolute_data_paths(config)
  check_backend(config)
  if data:
    check_corpus(config)
  return config


def absolute_path(path: str) -> str:
  if not path or '://' in path:   # unset, or a URL (gs://, file://, memory://)
    return path
  return os.path.abspath(os.path.expanduser(path))


def absolute_data_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose data paths (vocab, shards, text-file globs) are absolute."""
  config = config.copy_and_resolve_references()
  data = config.data
  data.vocab_path = absolute_path(data.vocab_path)
  data.shards_dir = absolute_path(data.shards_dir)
  for key in ('text_files', 'validation_files'):
    if data.get(key):
      data[key] = ','.join(sources.absolute_patterns(data[key]))
  return config


def training_kernel(config: ml_collections.ConfigDict) -> str:
  """The attention kernel the train step runs on this backend ('xla', 'cudnn' or 'splash':
  model.attention_impl resolved as the model resolves it); a ConfigError where the kernel
  named cannot run."""
  from bert_sym import model as model_lib  # pylint: disable=import-outside-toplevel
  cfg = config.model
  try:
    return kernel_choice.resolve_implementation(
        cfg.attention_impl, training_dropout=cfg.attention_dropout_rate > 0,
        return_weights=False, seq_len=config.data.max_seq_len,
        interpret=bool(cfg.get('kernel_interpret', False)),
        dtype=model_lib.compute_dtype(cfg.dtype), scanned=bool(cfg.get('scan_layers', False)),
        head_dim=cfg.hidden_size // cfg.num_heads)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_backend(config: ml_collections.ConfigDict) -> None:
  """What this machine must offer: the attention kernel, the mesh's devices, the batch split."""
  import jax  # pylint: disable=import-outside-toplevel
  from bert_sym import sharding  # pylint: disable=import-outside-toplevel
  training_kernel(config)
  try:
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    sharding.check_batch_size(config.batch_size, mesh, rules)
    sharding.check_batch_size(config.batch_size // config.optimizer.grad_accum_steps, mesh,
                              rules, 'batch_size / optimizer.grad_accum_steps')
  except ValueError as e:
    raise ConfigError(f'{e} ({jax.device_count()} {jax.devices()[0].platform} device(s) '
                      'here)') from None


def check_corpus(config: ml_collections.ConfigDict) -> None:
  """Opens (and verifies) the splits the run reads (no 'validation' with eval_steps=0); the
  data's vocabulary must fit the model's embedding table."""
  from bert_sym.input import iterator  # pylint: disable=import-outside-toplevel
  documents = None
  if config.data.source == 'seqio':   # the trainer reads through the registered task
    from bert_sym.input import seqio_tasks  # pylint: disable=import-outside-toplevel
    documents = seqio_tasks.task_documents
  for split in ('train', 'validation') if config.eval_steps else ('train',):
    blocks = iterator.load_blocks(config.data, split, documents)
    data_vocab = len(blocks.vocab_tokens)
    if data_vocab > config.model.vocab_size:
      raise ConfigError(
          f'the data vocabulary ({blocks.description}) has {data_vocab} tokens but '
          f'config.model.vocab_size={config.model.vocab_size}: ids >= '
          f'{config.model.vocab_size} have no embedding. Fix: '
          f'--config.model.vocab_size={data_vocab}.')


# ---- The command line of bert_sym.train: --help lists the config keys, errors are one line ----

def config_keys_help(config, config_file: str) -> str:
  """Every `--config.KEY=VALUE` that `config` accepts, with its current value."""
  from bert_sym import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: --help only)
  rows = list(checkpoint.flat_config(config).items())
  width = max(len(k) for k, _ in rows)
  shown = os.path.relpath(config_file, cli.CHECKOUT) if config_file.startswith(
      str(cli.CHECKOUT)) else config_file
  return '\n'.join([
      f'Config keys of --config={shown} (override any with --config.KEY=VALUE):'] + [
          f'  --config.{k:<{width}} {v!r}' for k, v in rows])


def parse_flags(argv, default_config: str = 'sym_base.py'):
  """absl flag parsing, with config_flags' unknown-key traceback turned into one line
  (a `UserError`; other flag errors are worded by `bert_sym.cli`). `--help` also lists
  the config keys, which absl cannot know (they come from a file). A flag given twice is
  refused: absl keeps the last, so `--config` passed to a launcher that passes its own
  trained another config than the one the launcher announced."""
  for flag in ('--config', '--workdir'):
    given = [a for a in argv[1:] if a == flag or a.startswith(f'{flag}=')]
    if len(given) > 1:
      raise UserError(f'{flag} is given {len(given)} times ({", ".join(given)}): one per run. '
                      'Fix: drop all but one (with launch/slurm_gpu.sbatch, set CONFIG= or '
                      'WORKDIR= instead of passing the flag).')
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    if any(a in cli.HELP_FLAGS for a in argv[1:]):
      _print_config_keys(argv, default_config)
    raise
  except (KeyError, AttributeError, TypeError) as e:
    if "'get_config'" in str(e):   # a file without get_config(): bert_sym.cli words it
      raise
    # ml_collections looked a key up inside a value (--config.model.attention.impl: a
    # TypeError on the string; .remat.policy: a KeyError naming 'Attribute' on the bool)
    through_a_value = key_through_a_value(argv, default_config)
    if through_a_value is None and isinstance(e, TypeError):
      raise
    raise UserError(through_a_value or unknown_key_line(e, argv)) from None


def key_through_a_value(argv, default_config: str) -> str | None:
  """The line for the first --config.A.B... whose A is a value, not a group of keys."""
  from bert_sym import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: errors only)
  loaded = _load_config(argv, default_config)
  if loaded is None:
    return None
  leaves = checkpoint.flat_config(loaded[0])
  for arg in argv[1:]:
    path = arg.split('=', 1)[0][len('--config.'):].split('.')
    for depth in range(1, len(path)):
      prefix = '.'.join(path[:depth])
      if arg.startswith('--config.') and prefix in leaves:
        return (f'unknown config key {".".join(path)!r} in {arg}: config.{prefix} is a '
                f'value ({leaves[prefix]!r}), not a group of keys. Fix: every key must '
                'exist in the config file (--help lists them).')
  return None


def unknown_key_line(error: Exception, argv, lister: str = '--help') -> str:
  """config_flags' KeyError for a mistyped --config.KEY (quotes, newlines and a "Did you
  mean" in its repr) as one line: the key, the flag, the fix, what lists keys (`lister`)."""
  found = re.search(r"([A-Za-z_]\w*)", str(error).replace('\\', ''))
  key = found.group(1) if found else str(error)
  culprits = [a for a in argv[1:] if a.startswith('--config.') and key and key in a]
  meant = re.search(r'Did you mean \W*"(\w+)\W*" instead', str(error))   # ml_collections'
  return (f'unknown config key {key!r}{" in " + ", ".join(culprits) if culprits else ""}. '
          f'Fix: {f"did you mean {meant.group(1)!r}? E" if meant else "e"}very key must '
          f'exist in the config file ({lister} lists them).')


def _load_config(argv, default_config: str):
  """(config, its file) of the command line's --config, without overrides; None if it
  does not load (then a message is printed)."""
  # --config=X or --config X (both accepted), else the headline config of this checkout.
  given = [a.split('=', 1)[1] if a.startswith('--config=') else argv[i + 1]
           for i, a in enumerate(argv) if a.startswith('--config=') or
           (a == '--config' and i + 1 < len(argv))]
  config_file = given[-1] if given else str(cli.CHECKOUT / 'configs' / default_config)
  cli.locate_config_files(['', f'--config={config_file}'])   # its package on sys.path
  try:
    return config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
        'help', config_file.split(':', 1)[0]).get_config(
            *config_file.split(':', 1)[1:2]), config_file
  except Exception as e:  # pylint: disable=broad-except
    print(f'(cannot list the config keys of {config_file}: {e})')
    return None


def _print_config_keys(argv, default_config: str) -> None:
  loaded = _load_config(argv, default_config)
  if loaded is not None:
    print(config_keys_help(*loaded))
