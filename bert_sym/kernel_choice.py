"""Which attention kernel runs: `model.attention_impl` resolved for a backend.

`xla` (plain XLA on every backend: the only kernel that returns attention weights, and the
one with attention dropout on every backend), `cudnn` (cuDNN flash attention, GPU), `pallas`
(our flash attention with attention dropout inside the kernel, GPU: bert_sym.flash_dropout;
not yet measured, so `auto` does not take it) and `splash` (the Mosaic splash kernel, TPU)
are exactly the kernels they name: asked for by name, a kernel runs or the config is
refused with the reason and the fix. `auto` takes the backend's kernel, or
xla where that kernel cannot apply, and logs which one it took and why (a warning when an
accelerator falls back). The model (bert_sym.attention), the trainer's preflight, GLUE and
the ahead-of-time compiler all resolve through `resolve_implementation`.
"""

import contextlib
import contextvars
import functools
import inspect

from absl import logging
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas', 'splash')
# The fused kernel `auto` picks on each backend (any other backend: xla).
BACKEND_KERNELS = {'gpu': 'cudnn', 'tpu': 'splash'}
SPLASH_BLOCK = 128   # splash tiles are multiples of the 128-lane vector width
# The TPU compiler (libtpu 0.0.42) fails the train step with a MosaicError otherwise.
SPLASH_FLOAT16 = ('model.dtype is float16, which the splash kernel cannot load on a TPU '
                  "(Mosaic: 'Invalid vector type for load')")
# Measured (benchmarks/RESULTS.md, 2026-12-06): so `auto` leaves attention dropout to xla,
# and `cudnn` named with dropout is an opt-in for another JAX.
CUDNN_DROPOUT_FAILED = (
    "attention dropout is on and cuDNN's in-kernel dropout failed on an H100 with jax "
    '0.11.2 (its backward aborted the process; the train step did not finish a step in '
    '70 s); set model.attention_impl=cudnn to try it with your JAX')


_TARGET_BACKEND = contextvars.ContextVar('target_backend', default=None)


@contextlib.contextmanager
def target_backend(backend: str):
  """Resolve kernels (and `model.dtype=auto`) for `backend` rather than the host's.

  Ahead-of-time compilation (bert_sym.aot) traces on a CPU host for a TPU slice: there,
  `auto` must pick splash and bfloat16, and splash must be the real Mosaic kernel.
  """
  token = _TARGET_BACKEND.set(backend)
  try:
    yield
  finally:
    _TARGET_BACKEND.reset(token)


def current_backend() -> str:
  """The backend the step is being built for: `target_backend`'s, else JAX's default."""
  return _TARGET_BACKEND.get() or jax.default_backend()


@functools.lru_cache(maxsize=None)   # each message once
def _log_once(message, level=logging.INFO):
  logging.log(level, '%s', message)


# The private JAX entry point that exposes cuDNN's in-kernel dropout (jax.nn's does not).
_CUDNN_DROPOUT_ARGS = ('dropout_rate', 'seed', 'q_seqlen', 'kv_seqlen', 'mask_type')


def cudnn_dropout_missing() -> str | None:
  """Why this JAX cannot run attention dropout inside cuDNN flash attention (None: it can)."""
  try:
    # pylint: disable=g-import-not-at-top
    from jax._src.cudnn import fused_attention_stablehlo as fused
  except ImportError as e:
    return f'jax {jax.__version__} has no jax._src.cudnn.fused_attention_stablehlo ({e})'
  parameters = inspect.signature(fused.dot_product_attention).parameters
  missing = [a for a in _CUDNN_DROPOUT_ARGS if a not in parameters]
  if missing or not hasattr(getattr(fused, 'MaskType', None), 'PADDING'):
    return (f'jax {jax.__version__}\'s cuDNN dot_product_attention lacks '
            f'{missing or ["MaskType.PADDING"]}')
  return None


def cudnn_head_dim_problem(head_dim: int | None) -> str | None:
  """Why cuDNN flash attention rejects this head size (None: it takes it), by the rule of
  JAX's check_is_flash_attention: a multiple of 8, at most 256 on Hopper or later, else 128."""
  try:
    largest = 256 if float(jax.devices('gpu')[0].compute_capability) >= 9.0 else 128
  except (RuntimeError, AttributeError, ValueError):   # no GPU here (AOT): the older rule
    largest = 128
  if head_dim and (head_dim % 8 or head_dim > largest):
    return (f'the head size {head_dim} (hidden_size / num_heads) is not a multiple of 8 of '
            f'at most {largest}, as cuDNN flash attention needs')
  return None


def resolve_implementation(impl: str, *, training_dropout: bool, return_weights: bool,
                           seq_len: int, backend: str | None = None,
                           interpret: bool = False, dtype=jnp.bfloat16,
                           scanned: bool = False, head_dim: int | None = None) -> str:
  """The kernel that runs: 'xla', 'cudnn', 'pallas' or 'splash' (the module docstring).

  `training_dropout`: attention dropout is on in this call (training, rate > 0).
  `interpret`: run Pallas kernels in interpret mode (tests on CPU), so 'splash' and
  'pallas' run on any backend. `dtype`: the compute dtype; `auto` does not give float32
  models to cuDNN, whose flash kernels are 16-bit only. `scanned`: the layers run in nn.scan
  (model.scan_layers), where cuDNN's in-kernel dropout cannot run (module docstring).
  `head_dim`: hidden_size / num_heads, which cuDNN limits (None: not checked).
  """
  backend = backend or current_backend()
  if impl == 'fused':
    raise ValueError(
        "model.attention_impl='fused' was removed: it ran plain XLA attention everywhere. "
        "Use 'auto' (cudnn on GPU, splash on TPU, xla on CPU), or name the kernel: "
        "'cudnn', 'splash' or 'xla'.")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention_impl={impl!r}; use one of {IMPLEMENTATIONS}.')
  if impl == 'auto':
    return _auto_kernel(backend, training_dropout, return_weights, seq_len, dtype, scanned,
                        head_dim)
  if impl == 'xla':
    return impl
  # A fused kernel asked for by name: it runs as asked or the config is wrong.
  needs = {'cudnn': 'gpu', 'pallas': 'gpu', 'splash': 'tpu'}[impl]
  if backend != needs and not (impl in ('splash', 'pallas') and interpret):
    raise ValueError(
        f"model.attention_impl='{impl}' needs a {needs.upper()} but the JAX backend is "
        f"{backend!r}. Set model.attention_impl=auto (picks the kernel for the backend) "
        f"or model.attention_impl=xla.")
  if impl == 'cudnn' and (head_problem := cudnn_head_dim_problem(head_dim)):
    raise ValueError(f"model.attention_impl='cudnn' cannot run: "
                     f"{head_problem}. Use model.attention_impl=auto "
                     f"(xla for this size) or change model.num_heads.")
  if impl == 'pallas':
    return _pallas_checked(seq_len, head_dim, return_weights)
  if training_dropout and impl == 'cudnn':
    why_not = _no_fused_dropout(impl, scanned)
    if why_not:
      raise ValueError(
          f"model.attention_impl='cudnn' with attention dropout cannot run: {why_not}. "
          f"Or use model.attention_impl=xla (the paper-exact recipe).")
  elif training_dropout:
    raise ValueError(
        f"model.attention_impl='{impl}' has no attention dropout, but "
        f"model.attention_dropout_rate > 0 in training. Set "
        f"model.attention_dropout_rate=0 (the fast recipe) or model.attention_impl=xla "
        f"(the paper-exact recipe).")
  if return_weights:
    raise ValueError(
        f"model.attention_impl='{impl}' cannot return attention weights; use "
        f"model.attention_impl=xla (or auto) for attention maps.")
  if impl == 'splash' and seq_len % SPLASH_BLOCK:
    raise ValueError(
        f"model.attention_impl='splash' needs a sequence length that is a multiple of "
        f"{SPLASH_BLOCK}, got {seq_len}; change data.max_seq_len or use "
        f"model.attention_impl=xla.")
  if impl == 'splash' and not interpret and jnp.dtype(dtype) == jnp.float16:
    raise ValueError(f"model.attention_impl='splash' cannot run: {SPLASH_FLOAT16}. Set "
                     "model.dtype=auto (bfloat16) or float32, or model.attention_impl=xla.")
  return impl


def _pallas_checked(seq_len: int, head_dim: int | None, return_weights: bool) -> str:
  """'pallas' if it can run these shapes (attention dropout or not), else the reason."""
  from bert_sym import flash_dropout  # pylint: disable=g-import-not-at-top  (Pallas: on demand)
  if return_weights:
    raise ValueError("model.attention_impl='pallas' cannot return attention weights; use "
                     "model.attention_impl=xla (or auto) for attention maps.")
  if why_not := flash_dropout.problem(seq_len, head_dim):
    raise ValueError(f"model.attention_impl='pallas' cannot run: {why_not}. Change "
                     f"data.max_seq_len or model.num_heads, or use model.attention_impl=xla.")
  return 'pallas'


def _auto_kernel(backend, training_dropout, return_weights, seq_len, dtype, scanned,
                 head_dim) -> str:
  """`auto`: the backend's kernel, or xla where it cannot apply (logged once, with why)."""
  kernel = BACKEND_KERNELS.get(backend, 'xla')
  why_not = None
  if kernel == 'cudnn' and training_dropout:   # cuDNN's failed on a GPU, whatever the layout
    why_not = CUDNN_DROPOUT_FAILED + (' and model.scan_layers=False' if scanned else '')
  elif kernel != 'xla' and training_dropout:   # splash has none
    why_not = _no_fused_dropout(kernel, scanned)
  elif kernel != 'xla' and return_weights:
    why_not = 'attention weights were asked for (return_weights)'
  elif kernel == 'splash' and seq_len % SPLASH_BLOCK:
    why_not = f'sequence length {seq_len} is not a multiple of {SPLASH_BLOCK}'
  elif kernel == 'splash' and jnp.dtype(dtype) == jnp.float16:
    why_not = SPLASH_FLOAT16
  elif kernel == 'cudnn' and jnp.dtype(dtype) == jnp.float32:
    why_not = ('model.dtype is float32 and cuDNN flash attention runs in 16 bits only '
               '(model.dtype=auto is bfloat16 on GPU)')
  elif kernel == 'cudnn' and (head_problem := cudnn_head_dim_problem(head_dim)):
    why_not = head_problem
  if why_not:
    # A warning, which the default logs show: the slow path is never taken unsaid.
    _log_once(f'attention_impl=auto on {backend}: using xla attention, not {kernel}, '
              f'because {why_not}.', logging.WARNING)
    return 'xla'
  _log_once(f'attention_impl=auto on {backend}: using {kernel} attention.')
  return kernel


def _no_fused_dropout(kernel: str, scanned: bool) -> str | None:
  """Why `kernel` cannot apply attention dropout here (None: it can)."""
  if kernel != 'cudnn':
    return (f'attention dropout is on (model.attention_dropout_rate > 0) and {kernel} has '
            f'none; set model.attention_dropout_rate=0 to train with {kernel}')
  missing = cudnn_dropout_missing()
  if missing:
    return (f'attention dropout is on and {missing}; upgrade jax[cuda], or set '
            'model.attention_dropout_rate=0 to train with cudnn')
  if scanned:
    return ('attention dropout is on and model.scan_layers=True: cuDNN\'s in-kernel dropout '
            'would meet other masks in the backward pass of a scanned layer; set '
            'model.scan_layers=False to train with cudnn')
  return None
