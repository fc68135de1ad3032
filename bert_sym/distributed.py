"""Multi-process start-up shared by the trainer and GLUE: one call, every launcher.

Cloud TPU pod slices, SLURM and Open MPI are detected from the environment; a run started
by hand passes --coordinator_address/--num_processes/--process_id. On CPU (tests,
debugging) collectives go through gloo.
"""

import errno
import os
import re
import socket
import types

from absl import app
from absl import flags
from absl import logging
import jax


def define_flags() -> types.SimpleNamespace:
  """The multi-process flags; call once, from the program's module."""
  return types.SimpleNamespace(
      distributed=flags.DEFINE_bool(
          'distributed', False,
          'Call jax.distributed.initialize() with auto-detection (Cloud TPU pod slices, '
          'SLURM, Open MPI). SLURM and MPI jobs with several tasks are detected without it.'),
      coordinator_address=flags.DEFINE_string(
          'coordinator_address', None,
          'host:port of process 0 for a multi-process run started by hand (e.g. several '
          'local processes). Not needed with --distributed or under SLURM, where '
          'jax.distributed.initialize() finds it from the environment.'),
      num_processes=flags.DEFINE_integer(
          'num_processes', None,
          'Number of processes (with --coordinator_address, or JAX_COORDINATOR_ADDRESS).'),
      process_id=flags.DEFINE_integer(
          'process_id', None,
          'This process\'s index, 0 to num_processes - 1 (with --num_processes).'),
  )


def _multiprocess_environment() -> str | None:
  """What in the environment says this process is one of several (None: nothing)."""
  env = os.environ
  # A SLURM job of several tasks counts only in a process srun started (it sets the
  # SLURM_STEP_* variables JAX's own detection reads): a batch script's own shell, or an
  # `salloc -n 4` one, runs a single process that has no step to join.
  tasks = env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1')) or '1'
  if 'SLURM_STEP_NODELIST' in env and int(tasks) > 1:
    return f'an srun step of {tasks} tasks (SLURM_STEP_NODELIST)'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):   # a multi-host Cloud TPU slice
    return 'a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES)'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return f'an Open MPI job (OMPI_COMM_WORLD_SIZE={env["OMPI_COMM_WORLD_SIZE"]})'
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return f'JAX_COORDINATOR_ADDRESS={env["JAX_COORDINATOR_ADDRESS"]}'
  return None


def _tasks_on_this_node(env) -> int | None:
  """Tasks of this SLURM step on this node, from e.g. SLURM_STEP_TASKS_PER_NODE='8(x2),4'."""
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  if not spec:
    return int(env['SLURM_NTASKS_PER_NODE']) if env.get('SLURM_NTASKS_PER_NODE') else None
  counts = []
  for part in spec.split(','):
    match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if not match:
      return None
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  node = int(env.get('SLURM_NODEID', 0))
  return counts[node] if node < len(counts) else None


def slurm_local_device_ids(env=None) -> list[int] | None:
  """The GPU ordinals (as this process sees them) that this SLURM task should drive.

  jax.distributed.initialize() on SLURM defaults to local_device_ids=[SLURM_LOCALID], which
  assumes every task sees all of its node's GPUs. With per-task binding
  (--gpus-per-task=1) each task sees only its own GPU as ordinal 0, so task 3 asks for a
  GPU 3 that does not exist (jax issues #23452, #28194); with one task per node it would
  drive 1 GPU of 8. Derived from CUDA_VISIBLE_DEVICES instead:

    task sees only its own GPUs (--gpus-per-task, or one GPU each): all of them;
    all tasks see the node's G GPUs, T tasks on the node: the LOCALID-th slice of G / T
    (also with --gpus-per-task=N --gpu-bind=none, where G = T x N).

  Where SLURM_GPUS_ON_NODE shows GPUs enough for each task's own set (--gpu-bind=closest,
  2 tasks on 8 GPUs: 4 each), a task drives all it sees. A task that sees several GPUs but
  fewer than the node's tasks otherwise shares them (closest with 8 tasks: a NUMA
  domain's 4 GPUs each; driving all of them, 4 processes would claim each GPU): a
  UsageError naming the fix. None (JAX's default) outside SLURM, without
  CUDA_VISIBLE_DEVICES, or on an uneven split.
  """
  env = os.environ if env is None else env
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if 'SLURM_LOCALID' not in env or not visible:
    return None
  tasks = _tasks_on_this_node(env)
  on_node = int(env.get('SLURM_GPUS_ON_NODE') or 0)
  if tasks and tasks * len(visible) <= on_node:
    return list(range(len(visible)))   # the tasks' GPU sets are disjoint: each its own
  if tasks and 1 < len(visible) < tasks and not env.get('SLURM_GPUS_PER_TASK'):
    raise app.UsageError(
        f'SLURM task {env["SLURM_LOCALID"]} sees {len(visible)} GPUs '
        f'(CUDA_VISIBLE_DEVICES={env["CUDA_VISIBLE_DEVICES"]}) and its node runs {tasks} '
        'tasks, so tasks would share GPUs (e.g. --gpu-bind=closest). Fix: one task per '
        'GPU with every task seeing the node\'s GPUs (no --gpu-bind, as '
        'launch/slurm_gpu.sbatch), or --gpus-per-task=1.')
  # --gpus-per-task=N with --gpu-bind=none: every task sees all tasks' GPUs, N each to take.
  per_task_flag = re.search(r'(\d+)$', env.get('SLURM_GPUS_PER_TASK', ''))   # '1', 'h100:2'
  own = int(per_task_flag[1]) if per_task_flag else 0
  unbound = bool(own and tasks and len(visible) == tasks * own > own)
  if (own and not unbound) or (tasks and len(visible) < tasks):
    return list(range(len(visible)))
  if not tasks or len(visible) % tasks:
    return None
  per_task = len(visible) // tasks
  local_id = int(env['SLURM_LOCALID'])
  return list(range(local_id * per_task, (local_id + 1) * per_task))


# A process that stops before it connects (a flag or config file wrong on its host only)
# leaves the others waiting out JAX's initialization timeout, then aborting in C++ with a
# page of stack that names no cause. Two processes given one --process_id cannot be caught
# here: JAX's coordination service keeps the newer, aborts the older in C++ at once (so
# no check after initialize ever sees both), and the id left out keeps the others waiting.
_IF_ONE_NEVER_CONNECTS = (
    'A process that never connects stops the others after 5 minutes (DEADLINE_EXCEEDED or '
    'UNAVAILABLE): its own output says why. One that aborts at once with ALREADY_EXISTS '
    '("a request from a newer incarnation") was given the --process_id of another: each '
    'process needs its own, 0 to num_processes-1.')


def _check_coordinator_port_free(address: str) -> None:
  """Process 0 serves the coordinator on the address's port, on every interface.

  gRPC binds it with SO_REUSEPORT, so a second process 0 on this host (a command copied
  without changing --process_id, or a run that did not stop) binds it too, and both wait
  out the 5-minute timeout, then abort in C++ naming no cause. A plain bind sees the
  listener. JAX binds JAX_COORDINATOR_BIND_ADDRESS's port instead where it is set (e.g.
  a container port behind a Kubernetes Service's)."""
  bind = os.environ.get('JAX_COORDINATOR_BIND_ADDRESS')
  port = (bind or address).rpartition(':')[2]
  if not port.isdigit():
    return   # JAX's own parsing reports it
  try:
    probe = socket.socket(socket.AF_INET6)   # dual-stack: sees IPv4 listeners too
  except OSError:   # IPv6 off in this kernel
    probe = socket.socket(socket.AF_INET)
  try:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # (TIME_WAIT is no owner)
    probe.bind(('', int(port)))
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise app.UsageError(
          f'--process_id=0 serves the coordinator at {address}, but port {port}'
          f'{" (JAX_COORDINATOR_BIND_ADDRESS)" if bind else ""} of this host is already in '
          'use: by another process 0 (of this run or an earlier one '
          'still running) or by another program. Fix: give each process its own '
          '--process_id, stop the other, or pick a free port.') from None
  finally:
    probe.close()


def initialize(cli: types.SimpleNamespace) -> None:
  """jax.distributed.initialize() when several processes share one run."""
  address = cli.coordinator_address.value
  count, index = cli.num_processes.value, cli.process_id.value
  found = _multiprocess_environment()
  trigger = ('--coordinator_address' if address else
             found or ('--distributed' if cli.distributed.value else None))
  if trigger is None:
    if count is not None or index is not None:
      # Else every process would train as a run of its own, all in one workdir.
      raise app.UsageError(
          '--num_processes/--process_id need --coordinator_address=host:port (where '
          'process 0 serves), or a launcher JAX detects (--distributed).')
    return
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    # CPU-only multi-process (tests, debugging) needs a collectives backend.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # On SLURM GPUs, which local GPUs this task drives comes from CUDA_VISIBLE_DEVICES (see
  # slurm_local_device_ids), with the flags or without.
  local_device_ids = (None if os.environ.get('JAX_PLATFORMS', '') == 'cpu'
                      else slurm_local_device_ids())
  if local_device_ids is not None:
    logging.info('SLURM task %s drives local GPUs %s (CUDA_VISIBLE_DEVICES=%s)',
                 os.environ.get('SLURM_LOCALID'), local_device_ids,
                 os.environ.get('CUDA_VISIBLE_DEVICES'))
  if address or count is not None or index is not None:
    if count is None or index is None:
      raise app.UsageError('--coordinator_address needs --num_processes and --process_id.'
                           if address else '--num_processes and --process_id go together: '
                           'pass both, or neither to let JAX detect them.')
    if not 0 <= index < count:
      raise app.UsageError(f'--process_id={index} with --num_processes={count}: process '
                           f'ids run from 0 to {count - 1}, one per process.')
    # Said before the call, which blocks until every process has connected (up to JAX's
    # 5 min), and whose own errors then blame another process.
    where = address or os.environ.get('JAX_COORDINATOR_ADDRESS') or 'the detected coordinator'
    if index == 0 and where != 'the detected coordinator':
      _check_coordinator_port_free(where)
    print(f'Process {index} of {count}: waiting for all processes at '
          f'{where} (process 0 serves it there). {_IF_ONE_NEVER_CONNECTS}', flush=True)
    try:
      jax.distributed.initialize(address, num_processes=count, process_id=index,
                                 **({'local_device_ids': local_device_ids}
                                    if local_device_ids is not None else {}))
    except ValueError as e:   # no address given or detected
      raise app.UsageError(f'jax.distributed.initialize: {e} Fix: pass '
                           '--coordinator_address=host:port (where process 0 serves).') from None
    if jax.process_count() != count:
      # The coordinator's count is the run's (this process joined it as one of those); a
      # different one here was said in the waiting line above, so it is corrected aloud.
      print(f'Process {index}: the run has {jax.process_count()} processes (process 0\'s '
            f'--num_processes), not the --num_processes={count} given here; this process '
            f'trains as {index} of {jax.process_count()}. Fix: pass the same '
            '--num_processes on every host.', flush=True)
  else:
    # TPU pod / SLURM / MPI: coordinator and process ids discovered from the env.
    print(f'Multi-process run ({trigger}): waiting for every process '
          '(jax.distributed.initialize with the coordinator found in the environment). '
          f'{_IF_ONE_NEVER_CONNECTS}', flush=True)
    try:
      jax.distributed.initialize(local_device_ids=local_device_ids)
    except ValueError as e:   # nothing to detect: a lone process, or a launcher JAX can't read
      raise app.UsageError(
          f'{trigger} asks for a multi-process run, but jax.distributed.initialize found '
          f'no cluster ({e}). Fix: start one process per task with srun (SLURM), mpirun '
          '(Open MPI 4; for Open MPI 5 pass the flags), or on every worker of a TPU slice; '
          'or pass --coordinator_address/--num_processes/--process_id'
          + ('; or drop --distributed.' if trigger == '--distributed' else '.')) from None
  logging.info('Process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
