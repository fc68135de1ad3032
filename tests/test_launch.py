"""launch/slurm_gpu.sbatch with SLURM's commands stubbed: a SIGTERM before the time
limit becomes a requeue, a finished run does not requeue, a failed task fails the job.

`srun` (stub) starts every task in its own session, as SLURM does, and the test signals
the tasks' process groups as `--signal=TERM@300` would. The trainer is a stand-in that
behaves as bert_sym.train does (tests/test_train.py checks the real one's exit codes): it
saves on SIGTERM and exits 42.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = 2

SRUN = """#!/bin/bash
# srun stub: records srun's own options (then drops them), runs the command once per task,
# each in its own session, and exits with the first failing task's code.
while [[ $1 == --* ]]; do echo "$1" >> "$STUB_DIR/srun_options"; shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i setsid "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [[ $rc -eq 0 ]] && rc=$code; }
done
exit $rc
"""

# The stand-in trainer: records its arguments, says where it can be signalled, then either
# exits with FAKE_TRAINER_EXIT or waits for SIGTERM, "saves" and exits 42.
TRAINER = """#!{python}
import os, signal, sys, time
task = os.environ['SLURM_PROCID']
out = os.environ['STUB_DIR']
def on_term(signum, frame):
  time.sleep(0.5)   # the save: the task's shell must still be there when it ends
  with open(f'{{out}}/saved-{{task}}', 'w') as f:
    f.write('saved')
  sys.exit(42)
signal.signal(signal.SIGTERM, on_term)
with open(f'{{out}}/args-{{task}}', 'w') as f:
  f.write('\\n'.join(sys.argv[1:]))
with open(f'{{out}}/srun_cpus-{{task}}', 'w') as f:   # what srun >= 22.05 gives each task
  f.write(os.environ.get('SRUN_CPUS_PER_TASK', '-'))
os.replace(f'{{out}}/args-{{task}}', f'{{out}}/ready-{{task}}')
with open(f'{{out}}/pgid-{{task}}.tmp', 'w') as f:   # whole when it appears
  f.write(str(os.getpgid(0)))
os.replace(f'{{out}}/pgid-{{task}}.tmp', f'{{out}}/pgid-{{task}}')
if 'FAKE_TRAINER_EXIT' in os.environ:
  code = int(os.environ['FAKE_TRAINER_EXIT'].split(',')[int(task)])
  sys.exit(code)
while True:
  time.sleep(0.1)
"""


@pytest.fixture
def slurm(tmp_path):
  """(start(env) -> Popen, stub directory): sbatch's script with stubbed SLURM commands."""
  stubs = tmp_path / 'bin'
  stubs.mkdir()
  for name, text in (('srun', SRUN), ('python', TRAINER.format(python=sys.executable)),
                     ('scontrol', f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol_calls\n')):
    (stubs / name).write_text(text)
    (stubs / name).chmod(0o755)
  submit_dir = tmp_path / 'submit'   # the job's shared submit directory (the marker's home)
  submit_dir.mkdir()

  def start(**env):
    full_env = dict(os.environ, PATH=f'{stubs}:{os.environ["PATH"]}', PYTHON=str(
        stubs / 'python'), STUB_DIR=str(tmp_path), WORKDIR=str(tmp_path / 'run'),
        SLURM_JOB_ID='1234', SLURM_NTASKS=str(TASKS), SLURM_NNODES='1',
        SLURM_SUBMIT_DIR=str(submit_dir), **env)
    return subprocess.Popen(
        ['bash', str(REPO_ROOT / 'launch' / 'slurm_gpu.sbatch'), '--config.total_steps=5'],
        env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return start, tmp_path


def _wait_for_tasks(stub_dir, process, timeout=60):
  start = time.time()
  while not all((stub_dir / f'pgid-{i}').exists() for i in range(TASKS)):
    assert process.poll() is None, process.stdout.read()
    assert time.time() - start < timeout, 'the tasks did not start'
    time.sleep(0.05)   # (pgid appears whole, after the handler is installed)


def test_sigterm_before_the_time_limit_saves_and_requeues(slurm):
  start, stub_dir = slurm
  process = start(SLURM_CPUS_PER_TASK='12')
  _wait_for_tasks(stub_dir, process)
  for i in range(TASKS):   # SLURM signals every process of every task
    os.killpg(int((stub_dir / f'pgid-{i}').read_text()), signal.SIGTERM)
  output, _ = process.communicate(timeout=60)
  assert process.returncode == 0, output
  assert all((stub_dir / f'saved-{i}').exists() for i in range(TASKS))
  assert (stub_dir / 'scontrol_calls').read_text() == 'requeue 1234\n'
  assert 'requeueing job 1234 to resume' in output
  assert not list((stub_dir / 'submit').glob('.bert_sym-preempted-*'))   # marker cleared
  # srun no longer inherits sbatch's --cpus-per-task (Slurm 22.05): passed on explicitly.
  assert (stub_dir / 'srun_cpus-1').read_text() == '12'
  args = (stub_dir / 'ready-1').read_text().splitlines()
  assert args == ['-m', 'bert_sym.train', '--config=configs/sym_base.py',
                  f'--workdir={stub_dir / "run"}', '--config.total_steps=5']


def test_a_finished_run_is_not_requeued(slurm):
  start, stub_dir = slurm
  process = start(FAKE_TRAINER_EXIT='0,0')
  output, _ = process.communicate(timeout=60)
  assert process.returncode == 0, output
  assert not (stub_dir / 'scontrol_calls').exists()


@pytest.mark.parametrize('codes', ['1,0', '0,1'])
def test_a_failed_task_fails_the_job_without_requeue(slurm, codes):
  start, stub_dir = slurm
  process = start(FAKE_TRAINER_EXIT=codes)
  output, _ = process.communicate(timeout=60)
  assert process.returncode == 1, output
  assert not (stub_dir / 'scontrol_calls').exists()
  # What ends the other tasks on a real cluster (the stub waits for them instead).
  assert '--kill-on-bad-exit=1' in (stub_dir / 'srun_options').read_text().split()


def test_a_preempted_worker_beside_a_failed_one_is_not_requeued(slurm):
  """Process 0 exits 42 but another task failed: the job fails instead of looping on
  requeues of a run that cannot go on."""
  start, stub_dir = slurm
  process = start(FAKE_TRAINER_EXIT='42,1')
  output, _ = process.communicate(timeout=60)
  assert process.returncode == 1, output
  assert not (stub_dir / 'scontrol_calls').exists()


def _sbatch_directives():
  """The script's #SBATCH options, as sbatch reads them: only those above its first
  command count (sbatch ignores the rest)."""
  options = {}
  for line in (REPO_ROOT / 'launch' / 'slurm_gpu.sbatch').read_text().splitlines()[1:]:
    if line.startswith('#SBATCH '):
      name, _, value = line.split()[1].partition('=')
      options[name] = value
    elif line.strip() and not line.startswith('#'):
      break
  return options


def test_the_job_asks_for_the_signal_and_requeue_the_readme_promises():
  """The tests above signal the tasks themselves, as SLURM would: without these
  directives, a real job got no SIGTERM before its time limit (killed unsaved) and could
  not be requeued, while those tests still passed. The README: SIGTERM 5 minutes before
  the time limit, one process per GPU, two nodes of 8 (bert_sym.aot's h100-16)."""
  options = _sbatch_directives()
  # To every task (a `B:` prefix would signal the batch shell alone, not the trainers).
  assert options.get('--signal') == 'TERM@300', options
  assert '--requeue' in options, options
  assert options.get('--ntasks-per-node') == options.get('--gpus-per-node') == '8', options
  assert options.get('--nodes') == '2', options


# ---- launch/tpu_vm.sh with gcloud stubbed: the worker script runs here, in a fake home ----

GCLOUD = """#!{python}
# gcloud stub: `compute tpus tpu-vm <verb> ...`. describe answers from SLICE_STATE (a
# comma-separated list: one state per describe, the last repeating), scp
# copies into the fake worker's home, ssh runs the --command there (one worker, standing
# for all: scp and ssh without --worker=all would reach worker 0 only, and are refused).
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
verb, home = args[3], os.environ['WORKER_HOME']
if '--zone' not in args or (verb in ('scp', 'ssh') and '--worker=all' not in args):
  sys.exit(f'gcloud stub: {{verb}} without --zone or --worker=all: {{args}}')
record = ' '.join(args[3:5])
if verb == 'create':
  record += ' ' + args[args.index('--version') + 1]
  with open(os.environ['STUB_DIR'] + '/gcloud_args', 'a') as f:
    f.write(' '.join(args) + '\\n')
if verb == 'ssh':   # which of the launcher's three passes
  command = args[args.index('--command') + 1]
  record += ' ' + ('install' if 'pip install' in command else
                   'start' if 'setsid' in command else 'stop')
with open(os.environ['STUB_DIR'] + '/gcloud_calls', 'a') as f:
  f.write(record + ('  --spot' if '--spot' in args else '') + '\\n')
if verb == 'describe':
  if '--format=json' in args:
    print(json.dumps({{'networkEndpoints': [{{}}] * 4}}))
  else:
    states = os.environ['SLICE_STATE'].split(',')
    counter = os.environ['STUB_DIR'] + '/describe_count'
    seen = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, 'w').write(str(seen + 1))
    print(states[min(seen, len(states) - 1)])
elif verb == 'scp':
  shutil.copy(args[4], os.path.join(home, args[5].split(':')[1]))
elif verb == 'ssh':
  command = args[args.index('--command') + 1]
  sys.exit(subprocess.run(['bash', '-c', command], env=dict(os.environ, HOME=home)).returncode)
"""

# The worker's venv python: version checks run for real; every other call is recorded.
WORKER_PYTHON = """#!{python}
import json, os, subprocess, sys
if sys.argv[1] == '-c':
  sys.exit(subprocess.run([{python!r}] + sys.argv[1:]).returncode)
with open(os.environ['STUB_DIR'] + '/worker_python_calls', 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if 'finalize' in sys.argv:   # FINALIZE_CODES: its exit code at each call (the last repeats)
  codes = os.environ.get('FINALIZE_CODES', '0').split(',')
  calls = open(os.environ['STUB_DIR'] + '/worker_python_calls').read().count('finalize')
  sys.exit(int(codes[min(calls, len(codes)) - 1]))
"""


def _executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


def _stubbed_slice(tmp_path, state, finalize_codes='0'):
  """(env, worker home) for launch/tpu_vm.sh with gcloud, the worker and its venv stubbed."""
  stubs, home = tmp_path / 'bin', tmp_path / 'worker_home'
  python = sys.executable
  version = f'{sys.version_info.major}.{sys.version_info.minor}'
  _executable(stubs / 'gcloud', GCLOUD.format(python=python))
  _executable(stubs / 'curl', '#!/bin/sh\necho 3\n')   # the metadata server's worker number
  _executable(stubs / 'sudo', '#!/bin/sh\necho "sudo was called" >&2; exit 1\n')
  _executable(stubs / 'sleep', '#!/bin/sh\nexit 0\n')   # the wait between finalize calls
  os.symlink(python, stubs / f'python{version}')
  # A venv left by an earlier launch on this worker: reused, its pip a no-op.
  _executable(home / 'bert_sym' / '.venv' / 'bin' / 'python',
              WORKER_PYTHON.format(python=python))
  _executable(home / 'bert_sym' / '.venv' / 'bin' / 'pip',
              f'#!/bin/sh\necho "$@" >> {tmp_path}/pip_calls\n')
  env = {k: v for k, v in os.environ.items()   # the launcher's own knobs, if set here
         if k not in ('RUNTIME_VERSION', 'JAX_SPEC', 'UNPINNED', 'PROJECT', 'PYTHON')}
  env.update(PATH=f'{stubs}:{os.environ["PATH"]}', STUB_DIR=str(tmp_path),
             WORKER_HOME=str(home), SLICE_STATE=state, SKIP_PREFLIGHT='1', SPOT='1',
             PYTHON_VERSION=version, EXPORT_TO='gs://bucket/c4_512',
             TFDS_DATA_DIR='gs://bucket/tensorflow_datasets', FINALIZE_CODES=finalize_codes)
  return env, home


def test_tpu_vm_launcher_ships_a_checkout_with_a_deleted_file_and_archives_before_creating(
    tmp_path):
  """A tracked file deleted from the disk (not `git rm`ed) made tar fail after the slice was
  created: a billed slice left idle. The checkout is now archived first, without it."""
  clone = tmp_path / 'clone'
  subprocess.run(['git', 'clone', '-q', str(REPO_ROOT), str(clone)], check=True)
  shutil.copy(REPO_ROOT / 'launch' / 'tpu_vm.sh', clone / 'launch' / 'tpu_vm.sh')   # under test
  (clone / 'README.md').unlink()
  (clone / 'notes.txt').write_text('a new file, not yet committed\n')
  env, home = _stubbed_slice(tmp_path, state='')   # no slice yet: created
  env.pop('EXPORT_TO')
  shipped = home / 'bert_sym'
  # What an earlier launch left: a module since deleted from the checkout, its log.
  (shipped / 'bert_sym').mkdir(parents=True)
  (shipped / 'bert_sym' / 'removed_since.py').write_text('import nothing\n')
  (shipped / 'train.log').write_text('the previous run\n')
  result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
                           'configs/sym_base.py', 'gs://bucket/sym_base'], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  calls = (tmp_path / 'gcloud_calls').read_text().splitlines()
  assert calls[:2] == ['describe bert-sym', 'create bert-sym tpu-ubuntu2204-base  --spot'], calls
  assert (shipped / 'notes.txt').is_file() and (shipped / 'bert_sym' / 'train.py').is_file()
  assert not (shipped / 'README.md').exists()
  assert not (shipped / 'bert_sym' / 'removed_since.py').exists()   # this checkout exactly
  assert (shipped / '.venv' / 'bin' / 'python').is_file()           # the venv is reused
  assert (shipped / 'train.log.previous').read_text() == 'the previous run\n'
  # The tested versions, as the preflight ran them (and again after a preemption).
  assert (tmp_path / 'pip_calls').read_text().splitlines()[-1] == (
      'install -q -c constraints.txt -r requirements.txt jax[tpu]')
  # Archived before step 1: when the archive cannot be made (a failing tar), no slice.
  (tmp_path / 'gcloud_calls').unlink()
  _executable(tmp_path / 'bin' / 'tar', '#!/bin/sh\necho "tar: failed" >&2; exit 2\n')
  result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
                           'configs/sym_base.py', 'gs://bucket/sym_base'], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and not (tmp_path / 'gcloud_calls').exists(), result.stdout


def _alive(pid) -> bool:
  try:
    status = pathlib.Path(f'/proc/{pid}/status').read_text()
  except FileNotFoundError:
    return False
  return '\nState:\tZ' not in status   # a zombie nobody reaped is gone too


def test_tpu_vm_relaunch_stops_the_whole_previous_run_not_only_its_shell(tmp_path):
  """A relaunch during the shard export killed only run.sh's shell: the exporter (its
  child) ran on beside the new launch's exporter, on the same parts."""
  env, home = _stubbed_slice(tmp_path, state='READY')
  env.pop('EXPORT_TO')
  (home / 'bert_sym').mkdir(parents=True, exist_ok=True)
  child_pid = tmp_path / 'exporter.pid'
  # run.sh of the previous launch, in its own session; its exporter takes 2 s to stop.
  exporter_code = ('import signal, sys, time; '
                   'signal.signal(signal.SIGTERM, lambda *_: (time.sleep(2), sys.exit(0))); '
                   'time.sleep(300)')
  previous = subprocess.Popen(
      ['bash', '-c', f'{sys.executable} -c "{exporter_code}" & echo $! > {child_pid}; wait'],
      start_new_session=True)
  # Reaped as soon as it dies: the launcher waits until `kill -0` fails, never on a zombie.
  threading.Thread(target=previous.wait, daemon=True).start()
  try:
    deadline = time.time() + 30
    while not child_pid.exists() or not child_pid.read_text().strip():
      assert time.time() < deadline
      time.sleep(0.05)
    exporter = int(child_pid.read_text())
    (home / 'bert_sym' / 'train.pid').write_text(str(previous.pid))
    result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b',
                             'v4-32', 'configs/sym_base.py', 'gs://bucket/sym_base'],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'stopping the previous trainer' in result.stdout
    # Gone before the install pass deleted the checkout under it, not only run.sh.
    assert not _alive(exporter), 'the previous run\'s exporter is still running'
  finally:
    previous.kill()


@pytest.mark.parametrize('state, finalize_codes', [
    ('READY', '0'), ('PREEMPTED', '0'),
    ('READY', '3,3,0'),   # parts still missing (exit 3): waits, then trains
    ('READY', '1')])      # a real error (exit 1): stops, where it waited forever
def test_tpu_vm_launcher_exports_shards_then_trains_from_them_on_every_worker(
    tmp_path, state, finalize_codes):
  """SKIP_PREFLIGHT=1 and EXPORT_TO: the worker converts its share of the corpus (worker
  3 of the slice's 4), waits for all parts, then trains from them with the user's extra
  flags intact; a preempted spot slice is deleted and recreated first."""
  env, home = _stubbed_slice(tmp_path, state, finalize_codes)
  result = subprocess.run(
      ['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
       'configs/sym_base.py', 'gs://bucket/sym_base', "--config.name=it's a run"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'Preflight' not in result.stdout

  # Stop, install and start: each pass done on every worker before the next begins.
  expected_gcloud = ['describe bert-sym', 'scp ', 'describe bert-sym', 'ssh bert-sym stop',
                     'ssh bert-sym install', 'ssh bert-sym start']
  if state == 'PREEMPTED':
    expected_gcloud[1:1] = ['delete bert-sym', 'create bert-sym tpu-ubuntu2204-base  --spot']
  calls = (tmp_path / 'gcloud_calls').read_text().splitlines()
  assert [c if not c.startswith('scp ') else 'scp ' for c in calls] == expected_gcloud
  assert (home / 'bert_sym' / 'bert_sym' / 'train.py').is_file()   # the checkout travelled

  calls_file = tmp_path / 'worker_python_calls'
  finalizes = len(finalize_codes.split(','))
  deadline = time.time() + 30   # run.sh runs in the background (nohup)
  log = home / 'bert_sym' / 'train.log'
  while len(calls_file.read_text().splitlines() if calls_file.exists() else []) < (
      1 + finalizes + (finalize_codes != '1')):
    assert time.time() < deadline, log.read_text()
    time.sleep(0.1)
  if finalize_codes == '1':   # run.sh has ended: had it looped, it would still be running
    pid = int((home / 'bert_sym' / 'train.pid').read_text())
    while _alive(pid):
      assert time.time() < deadline, log.read_text()
      time.sleep(0.1)
    assert len(calls_file.read_text().splitlines()) == 2, calls_file.read_text()
    return
  export, *finalize_calls, train_call = [json.loads(l)
                                         for l in calls_file.read_text().splitlines()]
  assert len(finalize_calls) == finalizes and len(set(map(tuple, finalize_calls))) == 1
  finalize = finalize_calls[0]
  assert export == ['-m', 'bert_sym.shards', 'export', '--task=bert_sym_mlm_c4',
                    '--max_seq_len=512', '--out_dir=gs://bucket/c4_512',
                    '--tfds_data_dir=gs://bucket/tensorflow_datasets', '--num_workers=4',
                    '--worker_index=3']
  assert finalize == ['-m', 'bert_sym.shards', 'finalize', '--out_dir=gs://bucket/c4_512',
                      '--stalled_after_minutes=180']
  assert train_call == ['-m', 'bert_sym.train', '--distributed', '--config=configs/sym_base.py',
                        '--workdir=gs://bucket/sym_base', "--config.name=it's a run",
                        '--config.data.shards_dir=gs://bucket/c4_512']
  assert (home / 'bert_sym' / 'train.pid').is_file()


@pytest.mark.parametrize('accelerator, runtime', [
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v5p-128', 'v2-alpha-tpuv5'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v4-32', 'tpu-ubuntu2204-base'),
    # As bert_sym.aot reads it: the v5e runtime and Cloud TPU's (lowercase) type name, where
    # it was the v4 runtime and a type gcloud refuses.
    ('V5E-16', 'v2-alpha-tpuv5-lite')])
def test_tpu_vm_launcher_creates_the_runtime_cloud_tpu_names_for_the_generation(
    tmp_path, accelerator, runtime):
  """Cloud TPU's software-versions table: v4 and older on tpu-ubuntu2204-base, v5e, v5p
  and v6e each on their own v2-alpha runtime (the launcher used the first for all)."""
  env, _ = _stubbed_slice(tmp_path, state='')
  env.pop('EXPORT_TO')
  result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', accelerator,
                           'configs/sym_base.py', 'gs://bucket/sym_base'], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  calls = (tmp_path / 'gcloud_calls').read_text().splitlines()
  assert calls[1] == f'create bert-sym {runtime}  --spot'
  if accelerator == 'V5E-16':
    assert 'v5litepod-16' in (tmp_path / 'gcloud_args').read_text()


def test_tpu_vm_launcher_runs_under_macos_bash_3():
  """macOS's /bin/bash is 3.2: bash 4's case-modifying expansions (${x,,}: 'bad
  substitution' there, before any work), associative arrays and mapfile stop the launcher
  on a laptop (V5E-16 was lowercased with ${3,,})."""
  script = (REPO_ROOT / 'launch' / 'tpu_vm.sh').read_text()
  bash4_only = re.findall(r'\$\{[^}]*(?:,,?|\^\^?)\}|declare -A|\bmapfile\b|\breadarray\b',
                          script)
  assert not bash4_only


@pytest.mark.parametrize('states, code, calls, said', [
    # Waited for until it was gone, then created (it waited 30 minutes, then failed).
    ('DELETING,DELETING,', 0, ['describe'] * 3 + ['create'], 'is DELETING; waiting'),
    ('CREATING,READY', 0, ['describe'] * 2, 'Reusing TPU VM'),
    ('READY\tv5litepod-16', 0, ['describe'], 'Reusing TPU VM'),   # the API's v5e-16
    # A slice of another size under the name: the preflight checked v5e-16, not it.
    ('READY\tv5litepod-8', 1, ['describe'], 'exists as a v5litepod-8 slice, not the v5e-16'),
    # A state the slice does not leave by itself: at once, with the command that does.
    ('STOPPED', 1, ['describe'], 'gcloud compute tpus tpu-vm start bert-sym'),
])
def test_tpu_vm_launcher_waits_only_for_states_that_settle(tmp_path, states, code, calls,
                                                           said):
  env, _ = _stubbed_slice(tmp_path, state=states)
  env.pop('EXPORT_TO')
  result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v5e-16',
                           'configs/sym_base.py', 'gs://bucket/sym_base'], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
  assert said in result.stdout + result.stderr
  made = [c.split()[0] for c in (tmp_path / 'gcloud_calls').read_text().splitlines()]
  assert made[:len(calls)] == calls and 'create' not in made[len(calls):], made
  if 'create' in calls:   # the Cloud TPU API's name for a v5e slice
    assert 'v5litepod-16' in (tmp_path / 'gcloud_args').read_text()


def test_tpu_vm_launcher_reads_0_as_off_and_refuses_other_switch_values(tmp_path):
  """SPOT=0 created a spot slice and SKIP_PREFLIGHT=0 skipped the preflight: only whether
  the variable was set counted."""
  env, _ = _stubbed_slice(tmp_path, state='')
  env.pop('EXPORT_TO')
  launch = lambda: subprocess.run(
      ['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32', 'configs/sym_base.py',
       'gs://bucket/sym_base'], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=120)
  env['SPOT'] = '0'
  result = launch()
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert (tmp_path / 'gcloud_calls').read_text().splitlines()[1] == (
      'create bert-sym tpu-ubuntu2204-base')   # no --spot
  (tmp_path / 'gcloud_calls').unlink()
  _executable(tmp_path / 'preflight_python', '#!/bin/sh\necho "preflight ran"; exit 1\n')
  env.update(SKIP_PREFLIGHT='0', PYTHON=str(tmp_path / 'preflight_python'))
  result = launch()
  assert result.returncode == 1 and 'preflight ran' in result.stdout, result.stdout
  assert not (tmp_path / 'gcloud_calls').exists()   # stopped before any slice
  env['SPOT'] = 'maybe'
  result = launch()
  assert result.returncode == 2 and 'SPOT=maybe must be 1' in result.stderr, result.stderr
  usage = subprocess.run(['bash', 'launch/tpu_vm.sh'], capture_output=True, text=True)
  assert usage.returncode == 2   # the whole header, which ended mid-sentence before
  assert usage.stdout.rstrip().endswith('SKIP_PREFLIGHT=1 skips it.'), usage.stdout[-300:]


def test_the_checkout_archive_leaves_out_a_venv_that_is_a_symbolic_link(tmp_path):
  """launch/tpu_vm.sh archives `git ls-files --others --exclude-standard`: with `.venv/`
  in .gitignore (directories only), a .venv that links to a venv elsewhere was archived,
  and every worker's tar stopped on it ("tar: .venv: Cannot open: File exists")."""
  shutil.copy(REPO_ROOT / '.gitignore', tmp_path / '.gitignore')
  subprocess.run(['git', 'init', '-q'], cwd=tmp_path, check=True)
  (tmp_path / 'venv_elsewhere').mkdir()
  os.symlink(tmp_path / 'venv_elsewhere', tmp_path / '.venv')
  (tmp_path / 'train.py').write_text('')
  listed = subprocess.run(['git', 'ls-files', '--others', '--exclude-standard'], cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout.split()
  assert '.venv' not in listed and 'train.py' in listed, listed


def test_tpu_vm_launcher_passes_the_workers_a_config_path_of_the_checkout_they_get(tmp_path):
  """CONFIG as an absolute path (or relative to another directory) passed the preflight
  here and went to every worker as typed, where no such file is: each trainer stopped on a
  created slice. A file outside the checkout, or one git ignores, is never shipped."""
  env, home = _stubbed_slice(tmp_path, state='READY')
  env.pop('EXPORT_TO')
  (tmp_path / 'mine.py').write_text('def get_config():\n  return None\n')
  (REPO_ROOT / 'configs' / '__pycache__').mkdir(exist_ok=True)   # ignored by git
  ignored = REPO_ROOT / 'configs' / '__pycache__' / f'launch_test_{os.getpid()}.py'
  ignored.write_text('def get_config():\n  return None\n')
  try:
    for config, cwd, refused in (
        (str(tmp_path / 'mine.py'), REPO_ROOT, 'is outside this checkout'),
        ('configs/absent.py', REPO_ROOT, 'no such file'),
        (str(ignored), REPO_ROOT, 'is ignored by git'),
        (f'{REPO_ROOT}/configs/sym_base.py:fast', tmp_path, None),
        ('../configs/sym_base.py:fast', REPO_ROOT / 'launch', None)):
      (tmp_path / 'worker_python_calls').unlink(missing_ok=True)
      result = subprocess.run(['bash', str(REPO_ROOT / 'launch' / 'tpu_vm.sh'), 'bert-sym',
                               'us-central2-b', 'v4-32', config, 'gs://bucket/run'], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=120)
      if refused:
        assert result.returncode == 2 and refused in result.stderr, (config, result.stderr)
        assert not (tmp_path / 'gcloud_calls').exists(), config
        continue
      assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
      calls, deadline = tmp_path / 'worker_python_calls', time.time() + 30   # nohup: wait
      while not calls.exists() or not calls.read_text().strip():
        assert time.time() < deadline
        time.sleep(0.1)
      assert json.loads(calls.read_text().splitlines()[0])[3] == (
          '--config=configs/sym_base.py:fast'), config
  finally:
    ignored.unlink()


@pytest.mark.parametrize('extra', ['--config=configs/tiny.py', '--workdir=gs://bucket/other',
                                   '--config.data.shards_dir=gs://bucket/mine',
                                   # not "set EXPORT_TO=gs://", which is set
                                   '--config.data.shards_dir=local/shards',
                                   # absl's other spelling: `--workdir VALUE` passed the
                                   # preflight (which ignores it) and stopped every trainer
                                   '--workdir gs://bucket/other', '--config configs/tiny.py',
                                   '--config.data.shards_dir gs://bucket/mine',
                                   # bert_sym.aot's: the preflight took them, the trainers
                                   # stopped ('Unknown command line flag')
                                   '--num_slices=2', '--out=report.json', '--noeval_step'])
def test_tpu_vm_launcher_refuses_an_argument_it_passes_itself(tmp_path, extra):
  """Given again, absl kept the user's (--config) or said 'defined twice' on every worker
  of a created slice (--config.data.shards_dir beside EXPORT_TO, SKIP_PREFLIGHT=1)."""
  env, _ = _stubbed_slice(tmp_path, state='')   # EXPORT_TO set
  result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
                           'configs/sym_base.py', 'gs://bucket/sym_base', *extra.split(' ')],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert ('passes that flag itself' in result.stderr or 'a flag of bert_sym.aot, which the '
          'trainer does not take' in result.stderr), result.stderr
  assert not (tmp_path / 'gcloud_calls').exists()


def test_tpu_vm_launcher_stops_before_creating_a_slice_for_a_run_that_names_no_data(tmp_path):
  """configs/sym_base.py reads exported shards: launched without
  --config.data.shards_dir or EXPORT_TO, every worker's trainer stopped as it started, on
  a slice created and billed. The preflight now refuses first, with the commands that
  prepare the shards."""
  env, _ = _stubbed_slice(tmp_path, state='')
  env.pop('EXPORT_TO')
  env.pop('SKIP_PREFLIGHT')
  env['PYTHON'] = sys.executable
  result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
                           'configs/sym_base.py', 'gs://bucket/sym_base'], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if 'error' in l]
  assert len(errors) == 1 and errors[0].startswith('bert_sym.aot: error: ')
  assert 'config.data.shards_dir is not set' in errors[0]
  assert 'bert_sym.shards export' in errors[0] and 'EXPORT_TO' in errors[0]
  assert 'nothing was created' in result.stderr
  assert not (tmp_path / 'gcloud_calls').exists()


# bert_sym.aot as the preflight runs it: writes a report of SEQ_LEN-token rows to --out.
AOT_STUB = """#!{python}
import json, subprocess, sys
if sys.argv[1] == '-c':
  sys.exit(subprocess.run([{python!r}] + sys.argv[1:]).returncode)
for out in [a.split('=', 1)[1] for a in sys.argv if a.startswith('--out=')]:
  json.dump({{'seq_len': int({seq_len!r}), 'task': {task!r}, 'fits': True}}, open(out, 'w'))
"""


@pytest.mark.parametrize('report, extra, fix', [
    # --config.data.max_seq_len=128: every worker exported 512-token shards (EXPORT_SEQ_LEN's
    # default), for hours, then every trainer refused them (shards of another length).
    (dict(seq_len=128, task='bert_sym_mlm_c4'), ['--config.data.max_seq_len=128'],
     {'EXPORT_SEQ_LEN': '128'}),
    # A config that trains another task than EXPORT_TASK (default bert_sym_mlm_c4): the same.
    (dict(seq_len=512, task='bert_sym_mlm_wikipedia'), [],
     {'EXPORT_TASK': 'bert_sym_mlm_wikipedia'}),
], ids=['seq_len', 'task'])
def test_tpu_vm_launcher_refuses_an_export_the_config_would_not_train_on(
    tmp_path, report, extra, fix):
  """EXPORT_TO with an EXPORT_SEQ_LEN or EXPORT_TASK other than the config's: the
  preflight's report says so before the slice exists, naming the setting that agrees."""
  env, _ = _stubbed_slice(tmp_path, state='READY')   # EXPORT_TO set
  env.pop('SKIP_PREFLIGHT')
  _executable(tmp_path / 'aot', AOT_STUB.format(python=sys.executable, **report))
  env['PYTHON'] = str(tmp_path / 'aot')
  command = ['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
             'configs/sym_base.py', 'gs://bucket/sym_base', *extra]
  launch = lambda env: subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                                      text=True, timeout=120)
  result = launch(env)
  assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
  [(name, value)] = fix.items()
  assert f'Fix: {name}={value}' in result.stderr, result.stderr
  assert not (tmp_path / 'gcloud_calls').exists()
  result = launch(dict(env, **fix))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_tpu_vm_launcher_refuses_a_jax_version_the_constraints_would_refuse(tmp_path):
  """JAX_SPEC='jax[tpu]==0.9.0' under constraints.txt (jax==0.10.2): pip failed on every
  worker after the slice existed and the old run had stopped. Refused here now, naming
  UNPINNED=1, with which it installs without the constraints."""
  env, _ = _stubbed_slice(tmp_path, state='READY')
  env.pop('EXPORT_TO')
  command = ['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
             'configs/sym_base.py', 'gs://bucket/sym_base']
  env['JAX_SPEC'] = 'jax[tpu]==0.9.0'
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stderr.strip() == (
      'JAX_SPEC=jax[tpu]==0.9.0 names a version, and workers install under constraints.txt '
      '(jax==0.10.2): drop the version, or set UNPINNED=1 to install without the constraints.')
  assert not (tmp_path / 'gcloud_calls').exists()
  env['UNPINNED'] = '1'
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert (tmp_path / 'pip_calls').read_text().splitlines()[-1] == (
      'install -q -r requirements.txt jax[tpu]==0.9.0')


def test_a_submit_from_outside_the_checkout_says_so_before_any_task_starts(tmp_path):
  """PYTHON defaults to .venv/bin/python in the submit directory: sbatch run from elsewhere
  started every task only for it to exit 127 (command not found)."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
  result = subprocess.run(
      ['bash', str(REPO_ROOT / 'launch' / 'slurm_gpu.sbatch')], capture_output=True, text=True,
      env=dict(env, WORKDIR=str(tmp_path / 'run'), SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_ID='1234'))
  assert result.returncode == 2, result.stderr
  assert 'PYTHON=.venv/bin/python: not found from' in result.stderr
  assert "Fix: submit from the checkout's root" in result.stderr



@pytest.mark.parametrize('flags', [['--config.data.shards_dir=/data/c4_512'],
                                   ['--config.data.shards_dir', 'c4_512']])
def test_tpu_vm_launcher_refuses_shards_the_workers_cannot_read(tmp_path, flags):
  """A local shards directory passed the preflight, which read it here, and stopped every
  worker's trainer on a created slice."""
  env, _ = _stubbed_slice(tmp_path, state='')
  env.pop('EXPORT_TO')
  result = subprocess.run(['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central2-b', 'v4-32',
                           'configs/sym_base.py', 'gs://bucket/sym_base', *flags],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stderr.startswith(f'--config.data.shards_dir={flags[-1].split("=")[-1]} is not '
                                  'on gs://, so the workers cannot read it. Fix: '), result.stderr
  assert not (tmp_path / 'gcloud_calls').exists()   # stopped before any slice
