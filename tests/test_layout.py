"""The package's layout: imports follow the data flow, no cycles, no oversized files; and no
committed file names a directory of the machine it was written on.

Data flows one way: config -> input -> model -> steps -> checkpoint -> train -> GLUE/export.
Every `import` / `from ... import` in bert_sym/ (top-level or inside a function, read with
`ast`, nothing imported) is an edge; a module may import modules of its own stage or of an
earlier one, never a later one, and the edges may not form a cycle.

`checkpoint` sits below `train` in imports although the trainer writes what GLUE reads:
it is the on-disk format that both sides share, so both import it and it imports neither.
"""

import ast
import re
import subprocess
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'bert_sym'

# The allowed direction, in one table: stage -> the modules in it (a trailing '.*' is a
# package and everything in it).
FLOW = (
    ('config', ('bert_sym.cli', 'bert_sym.early_signals', 'bert_sym.sharding',
                'bert_sym.distributed', 'bert_sym.files', 'bert_sym.tpu', 'bert_sym.gpu',
                'bert_sym.gpu_flags')),
    ('input', ('bert_sym.input.*',)),
    ('model', ('bert_sym.kernel_choice', 'bert_sym.flash_dropout', 'bert_sym.lean_backward',
               'bert_sym.attention', 'bert_sym.model')),
    ('steps', ('bert_sym.optim', 'bert_sym.objectives', 'bert_sym.steps')),
    ('checkpoint', ('bert_sym.checkpoint.*',)),
    ('train', ('bert_sym.config_check', 'bert_sym.metrics_writer', 'bert_sym.preemption',
               'bert_sym.loop', 'bert_sym.pretrain_loop', 'bert_sym.train', 'bert_sym.shards',
               'bert_sym.aot')),
    ('glue/export', ('bert_sym.glue.*', 'bert_sym.hf_export', 'bert_sym.ablate.*')),
)
MAX_LINES = 420   # "about 400": one job per file


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def stage_of(module: str) -> int | None:
  for index, (_, members) in enumerate(FLOW):
    for member in members:
      if module == member or (member.endswith('.*') and
                              (module + '.').startswith(member[:-1])):
        return index
      if member.endswith('.*') and module == member[:-2]:
        return index
  return None


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The bert_sym modules `module` imports (resolved to modules that exist)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  found = set()

  def add(name):
    # `from bert_sym import data` names a module; `from bert_sym.data import f` a name in
    # one: take the longest existing module prefix.
    while name and name not in known:
      name = name.rpartition('.')[0]
    if name and name != 'bert_sym' and name != module:
      found.add(name)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('bert_sym'):
          add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = '.'.join(anchor + ([base] if base else []))
      if not base.startswith('bert_sym'):
        continue
      for alias in node.names:
        full = f'{base}.{alias.name}'
        add(full if full in known else base)
  return found


def import_graph() -> dict[str, set[str]]:
  mods = modules()
  known = set(mods)
  return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_module_has_a_stage():
  unplaced = [m for m in modules() if m != 'bert_sym' and stage_of(m) is None]
  assert not unplaced, (f'{unplaced} are in no stage of tests/test_layout.py FLOW: add each '
                        f'to the stage whose data it handles.')


def test_imports_follow_the_flow():
  against = []
  for module, targets in import_graph().items():
    for target in targets:
      here, there = stage_of(module), stage_of(target)
      if here is not None and there is not None and there > here:
        against.append(f'{module} ({FLOW[here][0]}) imports {target} ({FLOW[there][0]})')
  assert not against, 'Imports against the flow:\n  ' + '\n  '.join(sorted(against))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'Import cycle: ' + ' -> '.join(cycle)


def test_the_checks_catch_what_they_claim():
  # The cycle finder and the stage rule on known graphs, so a broken check cannot pass.
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert stage_of('bert_sym.input.blocks') < stage_of('bert_sym.model')
  assert stage_of('bert_sym.glue.suite') > stage_of('bert_sym.train')
  assert stage_of('bert_sym.checkpoint') < stage_of('bert_sym.train')


def test_imports_seen_inside_functions(tmp_path):
  path = tmp_path / 'probe.py'
  path.write_text('def f():\n  from bert_sym import train\n  import bert_sym.model\n'
                  'from . import checkpoint\n')
  known = {'bert_sym.train', 'bert_sym.model', 'bert_sym.checkpoint', 'bert_sym.x'}
  assert imports_of('bert_sym.x', path, known) == {
      'bert_sym.train', 'bert_sym.model', 'bert_sym.checkpoint'}


@pytest.mark.parametrize('path', sorted(PACKAGE.rglob('*.py')), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_small(path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, (f'{path.relative_to(PACKAGE.parent)} has {lines} lines (limit '
                              f'{MAX_LINES}): split it by job.')


# Where the development machine, the GPU image and users' own machines keep files: a
# committed record that names one of them (a benchmark's --out, an ablation's workdir)
# points every other reader at a directory they do not have.
MACHINE_PATH = re.compile(r'(?:^|[^\w.$}~-])(/(?:work|root|home|Users)/[^\s"\'`),]*)')


def committed_files() -> list[pathlib.Path]:
  root = PACKAGE.parent
  listed = subprocess.run(['git', 'ls-files', '-z'], cwd=root, capture_output=True,
                          check=True).stdout.decode().split('\0')
  return [root / name for name in listed if name and (root / name).is_file()]


def test_no_committed_file_names_a_path_of_a_machine():
  found = []
  for path in committed_files():
    try:
      text = path.read_text()
    except UnicodeDecodeError:
      continue
    for number, line in enumerate(text.splitlines(), 1):
      found += [f'{path.relative_to(PACKAGE.parent)}:{number}: {match}'
                for match in MACHINE_PATH.findall(line)]
  assert not found, ('committed files name paths of the machine they were written on; use '
                     'a path relative to the repository or a placeholder ($OUT, '
                     '/path/to/...):\n' + '\n'.join(found))


# The examples spell each slash '{/}': written out, they would be the very paths the check
# looks for, in this committed file.
@pytest.mark.parametrize('line,named', [
    ('"workdir": "{/}work{/}main{/}runs{/}replication",', '{/}work{/}main{/}runs{/}replication'),
    ('--out={/}root{/}out{/}accelerator.json', '{/}root{/}out{/}accelerator.json'),
    ('cd {/}home{/}alice{/}bert_sym && make', '{/}home{/}alice{/}bert_sym'),
    ('--workdir=runs{/}replication --out=$OUT{/}x.json', None),
    ('gs:{/}{/}bucket{/}work{/}a; ~{/}work{/}x; src{/}work{/}y', None),
])
def test_the_machine_path_check_catches_what_it_claims(line, named):
  line, named = line.replace('{/}', '/'), named and named.replace('{/}', '/')
  assert MACHINE_PATH.findall(line) == ([named] if named else [])
