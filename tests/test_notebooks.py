"""Every notebook runs top to bottom (nbclient), at a tiny size, on the shared tiny grid.

The parameters cell (tagged `parameters`) keeps its defaults; a cell injected right after
it overrides them, as papermill does. A cell that raises fails the test.
"""

import contextlib
import os
import re
import subprocess
import sys
import tempfile

import flax
import jax
import nbclient
import nbformat
import numpy as np
import optax
import pytest

from bert_sym import checkpoint
from bert_sym import model as model_lib
from tests import ablate_fixtures as fx

NOTEBOOKS = os.path.join(fx.REPO_ROOT, 'notebooks')

# The tiny grid is trained once per test process: under `make test` (pytest-xdist,
# --dist loadgroup) every test that reads it runs in the same worker.
pytestmark = pytest.mark.xdist_group('ablate_grid')


def execute(name: str, parameters: str, timeout: int = 600):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name}: expected one cell tagged "parameters"'
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters))
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                                   resources={'metadata': {'path': NOTEBOOKS}})
  client.execute()   # raises CellExecutionError with the cell's traceback
  return nb


def _outputs(nb, output_type):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
          if o.output_type == output_type]


def test_committed_notebooks_have_no_outputs():
  for name in sorted(os.listdir(NOTEBOOKS)):
    if name.endswith('.ipynb'):
      nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
      for cell in nb.cells:
        if cell.cell_type == 'code':
          assert not cell.outputs and cell.execution_count is None, name


def test_ablation_notebook():
  workdir, _ = fx.tiny_grid()
  # Lists, as the attention notebook writes VARIANTS: the printed command said
  # --variants=['standard', 'pairwise'].
  nb = execute('ablation.ipynb', '\n'.join([
      f'CONFIG = {fx.CONFIG!r}', f'VARIANTS = {list(fx.VARIANTS)!r}',
      f'SEEDS = {list(fx.SEEDS)!r}', f'WORKDIR = {workdir!r}',
      f'OVERRIDES = {list(fx.overrides())!r}']))
  text = ''.join(o.get('text', '') for o in _outputs(nb, 'stream'))
  assert 'skipped' in text and 'bert_sym.train' not in text   # the grid was reused
  assert (f'--variants={",".join(fx.VARIANTS)} --seeds={",".join(map(str, fx.SEEDS))} '
          in text), text[:2000]
  shown = _outputs(nb, 'display_data')
  assert any('image/png' in o.data for o in shown)
  assert any('text/markdown' in o.data and '| standard |' in o.data['text/markdown']
             for o in shown)


def _write_run(out, config, params):
  """A workdir holding `params` at the grid's last step, as the trainer writes one."""
  os.makedirs(out)
  checkpoint.write_config(out, config)
  manager = checkpoint.make_manager(out, config.checkpoint)
  checkpoint.save(manager, fx.TOTAL_STEPS, {
      'params': params, 'opt_state': optax.adamw(1e-3).init(params),
      'step': np.int32(fx.TOTAL_STEPS), 'rng': jax.random.key_data(jax.random.key(0))},
      {'index': 0}, force=True)
  manager.wait_until_finished()
  manager.close()
  return out


def _scanned_copy(workdir, out):
  """The same weights as a run with model.scan_layers=True writes them (layers stacked)."""
  config, params = checkpoint.load_pretrained(workdir)
  config.model.scan_layers = True
  return _write_run(out, config, model_lib.stack_layers(params))


def _initialised_run(workdir, variant, out):
  """A run of `variant` at its initial weights (the grid trains two variants only)."""
  config, _ = checkpoint.load_pretrained(workdir)
  config.model.attention = variant
  variables = model_lib.BertForMaskedLM(config.model).init(
      jax.random.key(0), *model_lib.dummy_inputs(1, 8))
  return _write_run(out, config, flax.core.meta.unbox(variables['params']))


def test_attention_analysis_notebook(tmp_path):
  """On the grid's runs; pairwise's with its layers stacked, as scan_layers=True saves
  them (the notebook read per-layer parameters only, a KeyError on 'layer_0'); the other
  variants at their initial weights. Each variant's scores are recomputed from its
  projections and checked against the model's probabilities inside the notebook;
  symmetric's are symmetric, and standard_syminit's W_q W_k^T too (W_k = W_q at init)."""
  workdir, _ = fx.tiny_grid()
  dirs = {v: os.path.join(workdir, v, 'seed1') for v in fx.VARIANTS}
  dirs['pairwise'] = _scanned_copy(dirs['pairwise'], str(tmp_path / 'pairwise_scanned'))
  for variant in ('symmetric', 'pairwise_diagonal', 'standard_syminit'):
    dirs[variant] = _initialised_run(dirs['standard'], variant, str(tmp_path / variant))
  nb = execute('attention_analysis.ipynb', f'WORKDIRS = {dirs!r}')
  text = ''.join(o.get('text', '') for o in _outputs(nb, 'stream'))
  assert '||skew||/||P||' in text and 'W_q W_k^T' in text
  assert 'pairwise_diagonal layer 1 head 1: ||skew||/||P|| = 0.000' in text, text[-3000:]
  model = checkpoint.read_config(dirs['standard']).model
  layers, heads = model.num_layers, model.num_heads
  assert f'symmetric {[[0.0] * heads] * layers}' in text, text[-3000:]
  assert f'standard_syminit: ||sym(W_q W_k^T)||_F / ||W_q W_k^T||_F, layers x heads\n' \
         f'{np.ones((layers, heads))}' in text, text[-3000:]
  assert sum('image/png' in o.data for o in _outputs(nb, 'display_data')) >= 5


def test_attention_analysis_leaves_out_runs_of_another_config(tmp_path):
  """Trained through the runner (WORKDIRS empty) into a workdir where one variant's run
  finished with another config: the runner skips it and leaves it out of its summary; the
  notebook analysed it anyway, beside runs of the requested config."""
  import shutil  # pylint: disable=g-import-not-at-top
  grid, _ = fx.tiny_grid()
  workdir = str(tmp_path / 'abl')
  for variant in fx.VARIANTS:
    shutil.copytree(os.path.join(grid, variant, 'seed1'), os.path.join(workdir, variant, 'seed1'))
  other = os.path.join(workdir, 'pairwise', 'seed1')
  config = checkpoint.read_config(other)
  config.optimizer.learning_rate *= 2
  checkpoint.write_config(other, config)
  nb = execute('attention_analysis.ipynb', '\n'.join([
      'WORKDIRS = {}', f'VARIANTS = {list(fx.VARIANTS)!r}', f'TRAIN_CONFIG = {fx.CONFIG!r}',
      f'TRAIN_OVERRIDES = {list(fx.overrides())!r}', f'TRAIN_WORKDIR = {workdir!r}']))
  text = ''.join(o.get('text', '') for o in _outputs(nb, 'stream'))
  assert 'left out of the analysis: pairwise' in text and 'optimizer.learning_rate' in text
  assert not any(line.startswith('pairwise [[') for line in text.splitlines()), text[-3000:]
  assert any(line.startswith('standard [[') for line in text.splitlines()), text[-3000:]


def _setup_cell(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  (cell,) = [c for c in nb.cells[:3] if c.cell_type == 'code' and 'REPO_URL' in c.source]
  return cell.source


@pytest.mark.parametrize('name', ['ablation.ipynb', 'attention_analysis.ipynb'])
def test_setup_cell_finds_the_repository_or_says_what_to_set(name, tmp_path):
  """Opened from a clone (the notebook's folder), the first cell finds the package next to
  it; with no copy anywhere and no REPO_URL it says what to set, and clones nothing."""
  source = _setup_cell(name)
  run = lambda cwd: subprocess.run([sys.executable, '-c', source], cwd=cwd,
                                   capture_output=True, text=True, timeout=60)
  found = run(NOTEBOOKS)
  assert found.returncode == 0, found.stderr[-2000:]
  assert f'repository: {fx.REPO_ROOT}' in found.stdout
  lost = run(tmp_path)
  assert lost.returncode != 0
  assert 'No bert_sym repository found' in lost.stderr and 'set REPO_URL' in lost.stderr
  assert not (tmp_path / 'bert_sym').exists()


@pytest.mark.parametrize('notebook', ['ablation.ipynb', 'attention_analysis.ipynb'])
@pytest.mark.parametrize('accelerator', ['gpu', 'tpu', 'cpu'])
@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_the_colab_setup_installs_the_accelerators_jax_and_refuses_a_runtime_that_misses_it(
    notebook, accelerator, backend, tmp_path, monkeypatch):
  """On a Colab GPU or TPU runtime, requirements.txt alone could replace Colab's CUDA or TPU
  JAX by a CPU one: every run would then train on the CPU, unsaid. The setup cell (run here
  with Colab, nvidia-smi or the PCI bus, and the subprocesses stood in for) installs
  jax[cuda12] or jax[tpu] beside the requirements and stops if the runs' JAX sees another
  backend. A CPU runtime gets neither and no stop, also with libtpu installed (as in this
  test environment, which compiles for TPUs: libtpu is no sign of a TPU)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  cell = ''.join(nbformat.read(os.path.join(NOTEBOOKS, notebook), as_version=4).cells[1].source)
  root = _fresh_colab_upload(tmp_path, monkeypatch)
  monkeypatch.setattr(sys, 'path', list(sys.path))   # the cell puts the root on it
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
  monkeypatch.setattr(shutil, 'which', lambda name: '/usr/bin/nvidia-smi'
                      if name == 'nvidia-smi' and accelerator == 'gpu' else None)
  gvnic, tpu_v5e = ('0x1ae0', '0x0042'), ('0x1ae0', '0x0063')   # Google's NIC, a TPU chip
  _stand_in_pci_bus(monkeypatch, tmp_path, gvnic, *([tpu_v5e] if accelerator == 'tpu' else []))
  calls = []

  def run(command, **kwargs):
    del kwargs
    calls.append(command)
    return subprocess.CompletedProcess(command, 0, stdout=f'{backend}\n')
  monkeypatch.setattr(subprocess, 'run', run)
  refused = backend != accelerator and accelerator != 'cpu'
  wanted = {'gpu': ('an NVIDIA GPU', 'jax[cuda12]'), 'tpu': ('a TPU', 'jax[tpu]'),
            'cpu': (None, str(root / 'requirements.txt'))}[accelerator]
  if refused:
    with pytest.raises(RuntimeError, match=re.escape(
        f'has {wanted[0]} but JAX sees {backend}: pip install -U "{wanted[1]}"')):
      exec(cell, {})  # pylint: disable=exec-used
  else:
    exec(cell, {})  # pylint: disable=exec-used
  install = calls[0]
  assert install[1:5] == ['-m', 'pip', 'install', '-q'] and install[-1] == wanted[1]
  assert str(root / 'requirements.txt') in install[-2:]
  if accelerator == 'cpu':   # nothing asked of the runs' JAX
    assert calls == [install], calls
  # Run again in the same runtime: no second install (it checked for a .venv Colab lacks).
  calls.clear()
  with pytest.raises(RuntimeError) if refused else contextlib.nullcontext():
    exec(cell, {})  # pylint: disable=exec-used
  assert not [c for c in calls if 'pip' in c], calls
  # requirements.txt changed (a git pull): installed again.
  (root / 'requirements.txt').write_text('flax>=0.10\n')
  with pytest.raises(RuntimeError) if refused else contextlib.nullcontext():
    exec(cell, {})  # pylint: disable=exec-used
  assert [c for c in calls if 'pip' in c], calls


def _stand_in_pci_bus(monkeypatch, tmp_path, *devices):
  """The machine's PCI devices as (vendor id, device id) pairs: what the setup cell reads
  in /sys to tell a TPU runtime (this machine has none)."""
  import glob  # pylint: disable=g-import-not-at-top
  bus, real_glob = tmp_path / 'pci_devices', glob.glob
  for i, (vendor, device) in enumerate(devices):
    (bus / f'0000:00:{i:02x}.0').mkdir(parents=True)
    (bus / f'0000:00:{i:02x}.0' / 'vendor').write_text(vendor + '\n')
    (bus / f'0000:00:{i:02x}.0' / 'device').write_text(device + '\n')
  monkeypatch.setattr(glob, 'glob', lambda pattern, *a, **k: real_glob(
      pattern.replace('/sys/bus/pci/devices', str(bus)), *a, **k))


def _fresh_colab_upload(tmp_path, monkeypatch):
  """A repository uploaded to a fresh Colab runtime (no .venv), as the working directory,
  with the runtime's own temporary folder."""
  root = tmp_path / 'bert_sym'
  (root / 'bert_sym').mkdir(parents=True)
  (root / 'configs').mkdir()
  for name in ('bert_sym/__init__.py', 'configs/tiny.py', 'requirements.txt'):
    (root / name).write_text('')
  (tmp_path / 'runtime_tmp').mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'runtime_tmp'))
  monkeypatch.chdir(root)
  return root


def test_the_colab_setup_asks_for_a_restart_when_pip_changed_an_imported_package(
    tmp_path, monkeypatch):
  """Colab imports numpy (and often jax) before any cell: upgraded by pip under a running
  kernel, the old modules stayed loaded beside new files, and the runs failed in odd ways
  later. The cell says to restart the session, and the re-run installs nothing."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  cell = _setup_cell('ablation.ipynb')
  _fresh_colab_upload(tmp_path, monkeypatch)
  monkeypatch.setattr(sys, 'path', list(sys.path))
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
  versions = {'numpy': '1.26.4', 'jax': '0.4.30'}   # what the runtime imported
  monkeypatch.setattr(importlib.metadata, 'version', lambda name: versions.get(name, '1.0'))
  _stand_in_pci_bus(monkeypatch, tmp_path, ('0x1ae0', '0x0042'))   # Google's NIC: no TPU

  def pip(command, **kwargs):
    del kwargs
    if 'pip' in command:
      versions['numpy'] = '2.1.0'
    return subprocess.CompletedProcess(command, 0, stdout='cpu\n')
  monkeypatch.setattr(subprocess, 'run', pip)
  with pytest.raises(RuntimeError, match=r'pip changed numpy, which this runtime had already '
                                         r'imported: Runtime > Restart session'):
    exec(cell, {})  # pylint: disable=exec-used
  exec(cell, {})  # pylint: disable=exec-used
