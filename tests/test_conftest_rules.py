"""tests/conftest.py's own rules, run on a probe suite: with CI=true a skip that is not
marked `gpu` fails the session (a broken install must not pass as green skips); a
BERT_SYM_DATA_DIR that does not exist stops the session before any test runs."""

import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = '''
import pytest

def test_passes():
  pass

def test_skipped_for_a_missing_file():
  pytest.skip('no such file')

@pytest.mark.gpu
def test_gpu_only():
  pytest.skip('needs a GPU')

@pytest.mark.real_data
def test_on_real_data():
  pass
'''


@pytest.fixture(scope='module')
def probe_suite(tmp_path_factory):
  root = tmp_path_factory.mktemp('probe')
  # The repository's conftest, hooks and all, as the probe suite's own.
  (root / 'conftest.py').write_text('from tests.conftest import *  # noqa: F401,F403\n')
  (root / 'test_probe.py').write_text(textwrap.dedent(PROBE))

  def run(ci: str, *args, **env_vars):
    env = dict(os.environ, CI=ci, PYTHONPATH=str(REPO_ROOT), **env_vars)
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           '-rs', str(root), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  return run


def test_ci_fails_on_a_skip_that_is_not_gpu_only(probe_suite):
  result = probe_suite('true')
  assert result.returncode == 1, result.stdout[-3000:]
  assert ', 2 skipped' in result.stdout
  assert ('CI=true: 1 skipped test(s) are not GPU-only, so the run fails' in result.stdout
          and 'test_skipped_for_a_missing_file' in result.stdout), result.stdout[-3000:]


def test_ci_lets_gpu_only_skips_pass_and_local_runs_list_skips(probe_suite):
  gpu_only = probe_suite('true', '-k', 'not missing_file')
  assert gpu_only.returncode == 0, gpu_only.stdout[-3000:]
  local = probe_suite('')
  assert local.returncode == 0, local.stdout[-3000:]
  assert 'SKIPPED' in local.stdout and 'no such file' in local.stdout   # -rs lists the reason


def test_a_data_directory_that_does_not_exist_stops_the_session(probe_suite, tmp_path):
  missing = tmp_path / 'no_such_dir'
  result = probe_suite('', BERT_SYM_DATA_DIR=str(missing))
  assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout[-3000:]
  assert f'BERT_SYM_DATA_DIR={missing} does not exist' in result.stderr
  assert 'passed' not in result.stdout   # nothing ran


def test_real_data_tests_run_only_where_the_data_is(probe_suite, tmp_path):
  data = tmp_path / 'data'
  (data / 'glue').mkdir(parents=True)
  (data / 'wikitext-2').mkdir()
  with_data = probe_suite('', '-k', 'real_data', BERT_SYM_DATA_DIR=str(data))
  assert '1 passed' in with_data.stdout, with_data.stdout[-3000:]


# Without a plugin: only where none is installed (a skip elsewhere, so marked `gpu`).
@pytest.mark.parametrize('cuda_plugin', [pytest.param(False, marks=pytest.mark.gpu), True])
def test_unoptimised_compiles_only_where_jax_cannot_run_on_cuda(tmp_path, cuda_plugin):
  """The suite's fast-compile flag (LLVM without optimisations) is for XLA:CPU; with a jax
  CUDA plugin installed the GPU tests must run the kernels a user gets (it was set there
  too)."""
  from bert_sym import gpu_flags  # pylint: disable=g-import-not-at-top
  if not cuda_plugin and gpu_flags.cuda_plugin():
    pytest.skip(f'{gpu_flags.cuda_plugin()} is installed here: no machine without one')
  site = tmp_path / 'site'
  if cuda_plugin:   # the module `pip install jax[cuda13]` adds, as find_spec sees it
    (site / 'jax_cuda13_plugin').mkdir(parents=True)
    (site / 'jax_cuda13_plugin' / '__init__.py').write_text('')
  env = dict(os.environ, PYTHONPATH=f'{REPO_ROOT}{os.pathsep}{site}', XLA_FLAGS='')
  result = subprocess.run(
      [sys.executable, '-c', 'import os, tests.conftest; print(os.environ["XLA_FLAGS"])'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  flag_set = '--xla_backend_optimization_level=0' in result.stdout
  assert flag_set != cuda_plugin, result.stdout


def test_triton_s_library_loads_before_tensorflow_s(tmp_path):
  """With PyPI's (CUDA) torch, transformers loads triton's C extension lazily, after the
  tests imported TensorFlow, and the process crashes (SIGSEGV; tensorflow 2.21, triton
  3.7.1). The repository's conftest loads it first; a stand-in triton records the order."""
  stub, suite = tmp_path / 'site', tmp_path / 'suite'
  (stub / 'triton' / '_C').mkdir(parents=True)
  (stub / 'triton' / '__init__.py').write_text('')
  (stub / 'triton' / '_C' / '__init__.py').write_text('')
  order = tmp_path / 'order.txt'
  (stub / 'triton' / '_C' / 'libtriton.py').write_text(
      f"import sys\nopen({str(order)!r}, 'a').write("
      "f\"libtriton after tensorflow: {'tensorflow' in sys.modules}\\n\")\n")
  suite.mkdir()
  (suite / 'conftest.py').write_text('from tests.conftest import *  # noqa: F401,F403\n')
  (suite / 'test_both.py').write_text(
      'import tensorflow\n\ndef test_then_triton():\n  import triton._C.libtriton\n')
  env = dict(os.environ, CI='', PYTHONPATH=f'{stub}{os.pathsep}{REPO_ROOT}')
  result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           str(suite)], cwd=suite, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout[-3000:]
  assert order.read_text() == 'libtriton after tensorflow: False\n'


def test_a_suite_started_as_a_background_job_still_sends_ctrl_c(tmp_path):
  """`bash .ci/run &` from a script: bash without job control starts the job with SIGINT
  ignored, which its processes inherit, so the trainers of the Ctrl-C tests ignored their
  Ctrl-C (one exited 0 after a full run, a two-process run hung until the timeout)."""
  child = ('import signal; '
           'print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)')
  in_background = lambda command: subprocess.run(
      ['bash', '-c', f'{shlex.join(command)} & wait $!'], cwd=REPO_ROOT,
      env=dict(os.environ, CI='', PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
      timeout=300)
  # What the suite's processes start from, without the repository's conftest.
  assert in_background([sys.executable, '-c', child]).stdout.strip() == 'False'
  suite = tmp_path / 'suite'
  suite.mkdir()
  (suite / 'conftest.py').write_text('from tests.conftest import *  # noqa: F401,F403\n')
  (suite / 'test_child.py').write_text(textwrap.dedent(f'''\
      import subprocess, sys

      def test_a_child_process_takes_ctrl_c():
        out = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True,
                             text=True).stdout
        assert out.strip() == 'True', out
      '''))
  result = in_background([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                          str(suite)])
  assert result.returncode == 0, result.stdout[-3000:]
