"""Test-session rules: real-size data (tests/real_data.py) and no silent skips in CI.

With CI=true a skipped test fails the session unless it is marked `gpu` (it runs only
with, or only without, a GPU): a broken install or a missing file must not turn into green
skips. `make test` lists every skip with its reason (pytest -rs).
"""

import importlib.metadata
import importlib.util
import os
import shutil
import signal
import tempfile

# PyPI's torch is the CUDA build, with triton, whose C extension crashes the process
# (SIGSEGV) when it loads after TensorFlow's (tensorflow 2.21, triton 3.7.1); the other
# way round both work. transformers loads it lazily (torch._dynamo), long after a test has
# imported TensorFlow, so it is loaded here first. (`make test` installs the CPU torch,
# without triton, where PyTorch's index can be reached.)
if importlib.util.find_spec('triton') is not None:
  importlib.import_module('triton._C.libtriton')

import jax
from packaging import version
import pytest

from bert_sym import gpu_flags
from bert_sym import tpu
from tests import real_data

# The test venv installs libtpu (tests/test_aot.py compiles for TPU slices): off a TPU VM,
# every JAX process, test subprocesses included, would probe for a TPU and print a page of
# warnings before taking the CPU.
if tpu.no_tpu_here():
  tpu.use_the_cpu_without_a_tpu()       # this process, which imported JAX above
  os.environ['JAX_PLATFORMS'] = 'cpu'   # its subprocesses

# The suite is bound by XLA:CPU compiles of tiny programs: without LLVM's optimisations they
# compile ~3x faster (one GLUE test: 39 s -> 30 s; whole-suite times on a shared 2-core
# machine vary too much between runs to quote one gain). The HLO, and so what the
# tests compare, is the same; the TPU compiler of tests/test_aot.py ignores the flag (its
# report, memory and FLOPs included, was identical with and without it). Read when JAX
# creates its backend, so set before any test runs; subprocesses inherit it. Not where JAX
# can run on CUDA: the GPU tests (benchmarks/run_gpu.sh) check the kernels a user gets.
_FAST_CPU_COMPILE = '--xla_backend_optimization_level=0'
if ('xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', '')
    and gpu_flags.cuda_plugin() is None):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_CPU_COMPILE}".strip()


# The Ctrl-C tests send SIGINT to trainer and GLUE subprocesses. A shell without job
# control (a script, a CI runner) starts a background job with SIGINT ignored; every process
# it starts inherits that, and Python then installs no KeyboardInterrupt: those runs ignored
# their Ctrl-C (a two-process run trained on until the test's timeout). A handler here is
# reset to the default in every process started from this one: the xdist workers and the
# tests' subprocesses.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
  _check_xdist_groups(config)
  _share_compilation_cache(config)
  _own_user_cache(config)
  config.addinivalue_line(
      'markers', 'gpu: depends on whether a GPU is present; the only tests CI lets skip')
  config.addinivalue_line(
      'markers', f'real_data: needs the real-size data of ${real_data.ENV} (tests/real_data.py)')
  if real_data.expected() and not real_data.available():
    raise pytest.UsageError(
        f'{real_data.ENV}={real_data.data_dir()} does not exist: the real-size data is '
        f'expected there (glue/, wikitext-2/). Fix the path, or unset {real_data.ENV} to '
        'run without the real-size tests.')


_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


def _share_compilation_cache(config):
  """One JAX persistent compilation cache for the whole session: the xdist workers and every
  subprocess (GLUE and export CLIs; the trainer keeps its config's own cache dir) inherit
  the variable, so the tiny programs that many tests compile again are compiled once. The
  cache returns the executable a compile would produce, so no test sees a difference but
  time. It lives in a temporary directory removed at the end of the session."""
  if os.environ.get(_CACHE_ENV) or hasattr(config, 'workerinput'):
    return   # the user's own cache, or a worker that inherited the controller's
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='bert_sym_test_jax_cache_')
  # JAX caches only compiles over 1 s by default; most of the suite's take 0.2-1 s.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  # This process imported JAX before reading the variables (tests run here without xdist).
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_ENV])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True))


def _own_user_cache(config):
  """The trainer's compilation cache, GLUE's token ids and the rebuilt vocabulary go to
  files.user_cache_dir: without this, the tests' runs wrote into the user's ~/.cache, and
  how long a GLUE test took depended on what an earlier session had left there. A
  temporary directory for the whole session, shared by the workers and subprocesses
  (they inherit the variable), removed at the end."""
  if hasattr(config, 'workerinput'):
    return
  os.environ['BERT_SYM_CACHE'] = tempfile.mkdtemp(prefix='bert_sym_test_cache_')
  config.add_cleanup(lambda: shutil.rmtree(os.environ.pop('BERT_SYM_CACHE'), ignore_errors=True))


def pytest_collection_modifyitems(config, items):
  """Without the real-size data, its tests are not collected (not skipped)."""
  if real_data.available():
    return
  dropped = [item for item in items if item.get_closest_marker('real_data') is not None]
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = [item for item in items if item.get_closest_marker('real_data') is None]


def _check_xdist_groups(config):
  """`--dist loadgroup` must keep each xdist_group in one worker: else the group's shared
  fixture (the ablation grid, the paper-recipe TPU compile) is built in every worker,
  silently doubling the suite's slowest parts. pytest-xdist <= 3.8 tags a test's group by
  rewriting `Item._nodeid`, which pytest 9.2 no longer reads (requirements-test.txt)."""
  if config.getoption('dist', 'no') != 'loadgroup':
    return
  xdist_version = version.parse(importlib.metadata.version('pytest-xdist'))
  if (version.parse(pytest.__version__) >= version.parse('9.2')
      and xdist_version <= version.parse('3.8.0')):
    raise pytest.UsageError(
        f'pytest {pytest.__version__} with pytest-xdist {xdist_version} ignores xdist_group '
        'under --dist loadgroup. Install the versions of requirements-test.txt '
        '(pip install -r requirements-test.txt), or run without workers (-n 0).')


def _not_gpu_skips(session) -> list[str]:
  reporter = session.config.pluginmanager.get_plugin('terminalreporter')
  reports = reporter.stats.get('skipped', []) if reporter else []
  return [r.nodeid for r in reports if 'gpu' not in getattr(r, 'keywords', {})]


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, 'workerinput') or not _in_ci():
    return   # xdist workers: the controller sees every report
  skipped = _not_gpu_skips(session)
  if skipped and exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
  session.config.stash[_CI_SKIPS] = skipped


_CI_SKIPS = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  if not real_data.available():
    terminalreporter.write_line(
        f'Real-size data tests not collected: no {real_data.data_dir()} (set '
        f'{real_data.ENV} to the data directory to run them; see tests/real_data.py).')
  skipped = config.stash.get(_CI_SKIPS, [])
  if skipped:
    terminalreporter.write_line(
        f'CI=true: {len(skipped)} skipped test(s) are not GPU-only, so the run fails '
        f'(a broken install or a missing file?): {", ".join(skipped[:10])}', red=True)


def _in_ci() -> bool:
  return os.environ.get('CI', '').lower() in ('true', '1')


@pytest.fixture(autouse=True)
def _absl_verbosity_restored():
  """A command's main (metrics_writer.quiet_logs) sets absl's verbosity to WARNING for the
  whole process: the tests after it in that worker lost absl's INFO records (caplog)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  logger = absl_logging.get_absl_logger()
  before = logger.level   # NOTSET at first: absl's records follow the root logger's level
  yield
  logger.setLevel(before)
