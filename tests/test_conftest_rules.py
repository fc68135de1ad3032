"""tests/conftest.py's own rule, run on a probe suite: with CI=true a skip that is not
marked `gpu` fails the session (a broken install must not pass as green skips)."""

import os
import pathlib
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
'''


@pytest.fixture(scope='module')
def probe_suite(tmp_path_factory):
  root = tmp_path_factory.mktemp('probe')
  # The repository's conftest, hooks and all, as the probe suite's own.
  (root / 'conftest.py').write_text('from tests.conftest import *  # noqa: F401,F403\n')
  (root / 'test_probe.py').write_text(textwrap.dedent(PROBE))

  def run(ci: str, *args):
    env = dict(os.environ, CI=ci, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           '-rs', str(root), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  return run


def test_ci_fails_on_a_skip_that_is_not_gpu_only(probe_suite):
  result = probe_suite('true')
  assert result.returncode == 1, result.stdout[-3000:]
  assert '1 passed, 2 skipped' in result.stdout
  assert ('CI=true: 1 skipped test(s) are not GPU-only, so the run fails' in result.stdout
          and 'test_skipped_for_a_missing_file' in result.stdout), result.stdout[-3000:]


def test_ci_lets_gpu_only_skips_pass_and_local_runs_list_skips(probe_suite):
  gpu_only = probe_suite('true', '-k', 'not missing_file')
  assert gpu_only.returncode == 0, gpu_only.stdout[-3000:]
  local = probe_suite('')
  assert local.returncode == 0, local.stdout[-3000:]
  assert 'SKIPPED' in local.stdout and 'no such file' in local.stdout   # -rs lists the reason
