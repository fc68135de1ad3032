"""The trainer's XLA GPU flags (bert_sym/gpu_flags.py): only known flags, only on GPU, the
user's own XLA_FLAGS kept, and a knob that turns them off. Whether they help is measured
on a GPU by benchmarks/run_gpu.sh, not here."""

import importlib.util
import os
import subprocess
import sys

import pytest

from bert_sym import gpu_flags
from configs import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_flag_is_known_to_the_installed_xla_and_a_made_up_one_is_not():
  names = list(gpu_flags.GPU_FLAGS) + ['xla_gpu_enable_no_such_thing']
  assert gpu_flags.known_flags(names) == set(gpu_flags.GPU_FLAGS)


def test_xla_accepts_the_flags_at_start_up():
  """XLA aborts on a flag it does not know: the real parser, in a fresh process."""
  flags = ' '.join(f'--{n}={v}' for n, v in gpu_flags.GPU_FLAGS.items())
  code = 'import jax, jax.numpy as jnp; print(float(jnp.ones(3).sum()))'
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu'),
                          timeout=120, cwd=REPO_ROOT)
  assert result.returncode == 0 and result.stdout.strip() == '3.0', result.stderr[-2000:]
  bad = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=dict(os.environ, XLA_FLAGS='--xla_gpu_enable_no_such_thing=true',
                                JAX_PLATFORMS='cpu'), timeout=120, cwd=REPO_ROOT)
  assert bad.returncode != 0   # why a flag must be checked before it is set


def test_flags_are_added_after_the_users_own_and_never_override_them():
  environ = {'XLA_FLAGS': '--xla_gpu_enable_cublaslt=false'}
  added = gpu_flags.set_xla_gpu_flags(True, environ, force=True)
  assert '--xla_gpu_enable_cublaslt=true' not in added
  assert '--xla_gpu_enable_cudnn_layer_norm=true' in added
  assert environ['XLA_FLAGS'].startswith('--xla_gpu_enable_cublaslt=false ')


def test_knob_off_or_no_gpu_sets_nothing(monkeypatch):
  environ = {}
  assert gpu_flags.set_xla_gpu_flags(False, environ, force=True) == [] and not environ
  monkeypatch.setattr(gpu_flags, 'cuda_plugin', lambda: None)   # a CPU-only JAX
  assert gpu_flags.set_xla_gpu_flags(True, environ) == [] and not environ
  monkeypatch.setattr(gpu_flags, 'cuda_plugin', lambda: 'jax_cuda12_plugin')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')                      # GPU present, not used
  assert gpu_flags.set_xla_gpu_flags(True, environ) == [] and not environ


def test_the_knob_is_in_the_config_and_on_by_default():
  assert common.base_config('tiny').xla_gpu_flags is True


@pytest.mark.gpu
@pytest.mark.skipif(gpu_flags.cuda_plugin() is None, reason='needs a JAX with a CUDA plugin')
def test_gpu_plugin_knows_the_flags():
  assert gpu_flags.known_flags(list(gpu_flags.GPU_FLAGS)) == set(gpu_flags.GPU_FLAGS)


def test_the_pjrt_plugin_that_compiles_for_the_gpu_is_consulted(tmp_path, monkeypatch):
  """On a GPU, XLA_FLAGS are parsed by jax-cuda12-pjrt's xla_cuda_plugin.so. A flag that
  library does not know would abort the start-up, whatever jaxlib knows: a stand-in
  plugin that names only xla_dump_to must leave every flag out."""
  plugin = tmp_path / 'jax_plugins' / 'xla_cuda12'
  plugin.mkdir(parents=True)
  (plugin / '__init__.py').write_text('')
  (plugin / 'xla_cuda_plugin.so').write_bytes(b'\0xla_dump_to\0')
  monkeypatch.syspath_prepend(str(tmp_path))
  for name in [m for m in sys.modules if m.startswith('jax_plugins')]:
    monkeypatch.delitem(sys.modules, name)
  assert plugin / 'xla_cuda_plugin.so' in gpu_flags._xla_libraries()  # pylint: disable=protected-access
  assert gpu_flags.known_flags(list(gpu_flags.GPU_FLAGS)) == set()


def test_no_plugin_installed_means_none_and_an_installed_one_is_named(monkeypatch):
  """A CPU-only JAX taken for a CUDA one turns off conftest's fast-compile flag and adds
  the trainer's GPU flags where no GPU can run."""
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
  assert gpu_flags.cuda_plugin() is None
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: object() if name == 'jax_cuda13_plugin' else None)
  assert gpu_flags.cuda_plugin() == 'jax_cuda13_plugin'


def test_flags_are_not_set_once_a_backend_has_started(monkeypatch):
  """XLA reads XLA_FLAGS once: set later, they would be logged as on but do nothing."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  environ = {'XLA_FLAGS': '--foo=1'}
  assert gpu_flags.set_xla_gpu_flags(True, environ, force=True) == []
  assert environ == {'XLA_FLAGS': '--foo=1'}
