"""constraints.txt is the set the tests run with: `make` installs requirements*.txt under
it, so a fresh `make demo` / `make test` gets the tested versions, not the newest that
requirements.txt's ranges admit (on PyPI, jax 0.12 where the tests ran 0.10.2)."""

import importlib.metadata
import pathlib
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _requirements(name):
  lines = (ROOT / name).read_text().splitlines()
  return [Requirement(line.split('#')[0].strip()) for line in lines
          if line.split('#')[0].strip() and not line.startswith('-')]


def _pins():
  return {canonicalize_name(r.name): str(r.specifier).removeprefix('==')
          for r in _requirements('constraints.txt')}


def test_every_pin_is_the_installed_version():
  pins = _pins()
  installed = {name: importlib.metadata.version(name) for name in pins}
  assert pins == installed


def test_every_requirement_is_pinned_within_its_range():
  pins = _pins()
  for file in ('requirements.txt', 'requirements-test.txt', 'requirements-tpu.txt'):
    for requirement in _requirements(file):
      name = canonicalize_name(requirement.name)
      if name == 'torch':   # pinned in requirements-test.txt (the CPU build's +cpu aside)
        continue
      assert name in pins, f'{requirement.name} of {file} is not in constraints.txt'
      assert requirement.specifier.contains(pins[name], prereleases=True), (
          f'{file}: {requirement} excludes the tested {name}=={pins[name]}')


def test_make_installs_under_the_constraints():
  installs = [line for line in re.findall(r'pip install[^\n]*-r requirements[^\n]*',
                                          (ROOT / 'Makefile').read_text())
              if 'requirements-gpu-compiler.txt' not in line]   # exact pins, --no-deps
  assert len(installs) == 2 and all('-c constraints.txt' in line for line in installs), installs
