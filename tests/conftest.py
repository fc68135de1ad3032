"""Test-session rules: real-size data (tests/real_data.py) and no silent skips in CI.

With CI=true a skipped test fails the session unless it is marked `gpu` (it runs only
with, or only without, a GPU): a broken install or a missing file must not turn into green
skips. `make test` lists every skip with its reason (pytest -rs).
"""

import os

import pytest

from bert_sym import tpu
from tests import real_data

# The test venv installs libtpu (tests/test_aot.py compiles for TPU slices): off a TPU VM,
# every JAX process, test subprocesses included, would probe for a TPU and print a page of
# warnings before taking the CPU.
if tpu.no_tpu_here():
  os.environ['JAX_PLATFORMS'] = 'cpu'


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'gpu: depends on whether a GPU is present; the only tests CI lets skip')
  config.addinivalue_line(
      'markers', f'real_data: needs the real-size data of ${real_data.ENV} (tests/real_data.py)')
  if real_data.expected() and not real_data.available():
    raise pytest.UsageError(
        f'{real_data.ENV}={real_data.data_dir()} does not exist: the real-size data is '
        f'expected there (glue/, wikitext-2/). Fix the path, or unset {real_data.ENV} to '
        'run without the real-size tests.')


def pytest_collection_modifyitems(config, items):
  """Without the real-size data, its tests are not collected (not skipped)."""
  if real_data.available():
    return
  dropped = [item for item in items if item.get_closest_marker('real_data') is not None]
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = [item for item in items if item.get_closest_marker('real_data') is None]


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
