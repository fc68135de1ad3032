"""Mesh from the config, logical axis rules -> NamedSharding, host batches -> global arrays.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, ...; see
model.py); `config.sharding_rules` maps them onto the mesh axes `data`, `fsdp`, `tensor`.
Changing the parallelism layout is changing the config, never the model:

  pure data parallel   mesh.data=-1                       (params replicated)
  FSDP / ZeRO-3        mesh.data=1, mesh.fsdp=-1          ('embed' -> 'fsdp' shards params)
  data x tensor        mesh.data=4, mesh.tensor=2         ('mlp', 'heads', 'vocab' -> 'tensor')

Batches follow the same table: the `batch` rule (default ('data', 'fsdp')) names the mesh
axes the leading batch dimension is split over; the others (normally 'tensor') replicate it.
"""

import contextlib
import contextvars
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

MESH_AXES = ('data', 'fsdp', 'tensor')
# Every logical axis name the models (MLM and GLUE, scanned or not) give their arrays and
# activations (tests/test_sharding.py reads them off the models): a rule naming another
# one would shard nothing, silently (flax replicates what no rule names).
LOGICAL_AXES = ('batch', 'vocab', 'embed', 'embed_out', 'mlp', 'heads', 'kv', 'layers',
                'classes')


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the one -1 entry of config.mesh and checks the product equals the devices."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  described = ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh ({described}): at most one axis may be -1 (the rest).')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh ({described}): sizes must be positive or -1.')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh ({described}) needs a multiple of {fixed} devices, but JAX sees '
          f'{num_devices}. Change --config.mesh.* so the fixed axes divide {num_devices}.')
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'config.mesh ({described}) has {fixed} devices but JAX sees {num_devices}. Set one '
        f'axis to -1 or make the product {num_devices}.')
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: jit propagates shardings from the in/out shardings we give it.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
  # Multi-slice (TPU slices joined over the data-center network, DCN): only the `data`
  # axis crosses slices (one gradient all-reduce per step over the slow links); fsdp and
  # tensor stay inside a slice, on its fast interconnect (ICI).
  if shape[0] % slices:
    # JAX gives GPUs of different nodes different slice indices too (NVLink inside a node,
    # the network between them): FSDP alone (data=1) cannot span nodes.
    what = 'nodes' if devices[0].platform == 'gpu' else 'slices'
    raise ValueError(
        f'config.mesh data={shape[0]} must be a multiple of the {slices} {what} (only the '
        f'data axis spans {what}; fsdp and tensor stay inside one). Set --config.mesh.data='
        f'{slices if -1 in [mesh_config[a] for a in MESH_AXES] else -1} or a multiple of '
        f'{slices}.')
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  per_slice = (shape[0] // slices,) + tuple(shape[1:])
  grid = mesh_utils.create_hybrid_device_mesh(
      per_slice, (slices,) + (1,) * (len(shape) - 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


_KERNEL_MESH = contextvars.ContextVar('kernel_mesh', default=None)


@contextlib.contextmanager
def kernel_mesh(mesh: Mesh, rules):
  """While a step is traced: the mesh and logical axis rules that kernels which must run
  in shard_map (splash attention) split their work by. Our own context rather than flax's
  `nn.logical_axis_rules`: under that, flax also constrains the boxed parameters DenseGeneral
  re-creates for its shape checks, which fails for multi-axis features."""
  token = _KERNEL_MESH.set((mesh, rules))
  try:
    yield
  finally:
    _KERNEL_MESH.reset(token)


def current_kernel_mesh() -> tuple[Mesh, Any] | None:
  return _KERNEL_MESH.get()


def constrain(x, logical_axes: Sequence[str | None]):
  """`x` split as its logical axes say under the rules of the step being traced (as
  MaxText constrains its activations); unchanged outside a traced step, and along any
  dimension its mesh axes do not divide.

  Without it XLA is free to follow FSDP's weights (embed split over `fsdp`) into the
  activations: all-to-alls in every layer and more memory per chip than data parallelism
  (tiny on v5e-4: 3.3x the temporaries), the opposite of what FSDP is for."""
  context = current_kernel_mesh()
  if context is None:
    return x
  mesh, rules = context
  spec = _divisible_spec(nn.logical_to_mesh_axes(tuple(logical_axes), rules), x.shape, mesh,
                         name=None)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def logical_rules(config: ml_collections.ConfigDict) -> tuple:
  """config.sharding_rules as flax expects them (tuples; config.json turns them to lists)."""
  rules, given = [], config.sharding_rules
  for rule in given if isinstance(given, (list, tuple)) else [given]:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
      # e.g. "(('batch', 'data'))", a pair without its trailing comma: a ValueError
      # "too many values to unpack", naming neither the key nor the fix.
      raise ValueError(f'config.sharding_rules={given!r}: {rule!r} is not a (logical axis, '
                       'mesh axes) pair. Fix: a tuple of pairs, e.g. --config.sharding_rules='
                       "\"(('batch', 'data'), ('embed', 'fsdp'), ('kv', None))\" (one pair: "
                       "\"(('batch', 'data'),)\").")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      unknown = [a for a in axes if a not in MESH_AXES]
    else:
      unknown = [axes] if axes is not None and axes not in MESH_AXES else []
    if unknown:
      raise ValueError(f'config.sharding_rules maps {name!r} to unknown mesh axis '
                       f'{unknown}; mesh axes are {MESH_AXES}.')
    if name not in LOGICAL_AXES:
      raise ValueError(f'config.sharding_rules names {name!r}, which no array of the model '
                       f'has, so the rule would shard nothing. Fix: one of {LOGICAL_AXES}.')
    rules.append((name, axes))
  return tuple(rules)


def _axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                    name: str | None):
  """Replicates any dimension its mesh axes do not divide (e.g. vocab 30522 on 4 ways),
  with a warning naming `name` (None: silently, as for activations)."""
  fixed = list(spec) + [None] * (len(shape) - len(spec))
  for i, axes in enumerate(fixed):
    if axes is not None and shape[i] % _axes_size(mesh, axes):
      if name is not None:
        logging.warning('%s: dim %d (size %d) is not divisible by mesh axes %s of size %d; '
                        'replicating it instead.', name, i, shape[i], axes,
                        _axes_size(mesh, axes))
      fixed[i] = None
  return PartitionSpec(*fixed)


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedSharding per leaf of a tree with `nn.Partitioned` boxes (e.g. from eval_shape).

  The result has the structure of the unboxed tree. Leaves without logical names
  (step counters, RNG) are replicated.
  """
  def to_sharding(path, leaf):
    if isinstance(leaf, nn.Partitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      name = jax.tree_util.keystr(path)
      return NamedSharding(mesh, _divisible_spec(spec, leaf.value.shape, mesh, name))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map_with_path(
      to_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """NamedSharding per leaf of `tx.init(params)`, without allocating anything.

  Per-parameter state (Adam's moments, anything optax marks as params-shaped) shards
  exactly like its parameter, so FSDP/tensor layouts cover the optimizer too; everything
  else (step counts, schedule state, masked-out placeholders) is replicated.
  `abstract_params` is the unboxed params tree (ShapeDtypeStructs suffice) and
  `param_shardings` the matching tree of shardings.
  """
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated(mesh))


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes of the logical 'batch' axis in `rules` (from `logical_rules`)."""
  found = [axes for name, axes in rules if name == 'batch']
  if not found:
    raise ValueError("config.sharding_rules has no 'batch' entry; add e.g. "
                     "('batch', ('data', 'fsdp')) to say which mesh axes split the batch.")
  axes = found[0]
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Leading (batch) dimension split over the 'batch' rule's axes; replicated elsewhere."""
  axes = batch_axes(rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def data_parallel_size(mesh: Mesh, rules) -> int:
  return _axes_size(mesh, batch_axes(rules) or None)


def check_batch_size(batch_size: int, mesh: Mesh, rules,
                     what: str = 'batch_size') -> int:
  """Returns the per-process batch; raises a readable error when it does not split.

  The processes are those of the mesh's devices, not of this process's runtime: a
  compile-only TPU topology (bert_sym.aot) knows its hosts while one process compiles, so
  a mesh that every host of the slice would refuse is refused before the slice is rented."""
  dp = data_parallel_size(mesh, rules)
  processes = len({d.process_index for d in mesh.devices.flat})
  axes = batch_axes(rules)
  if batch_size % dp:
    raise ValueError(
        f'config.{what}={batch_size} is not divisible by the data-parallel size '
        f'{" x ".join(axes) or "(none)"} = '
        f'{" x ".join(str(mesh.shape[a]) for a in axes) or "1"} = {dp}. Fix: a multiple '
        f'of {dp}, or a config.mesh whose data-parallel size divides {batch_size} (a '
        'resumed run keeps its batch: there, change the mesh or the device count).')
  if batch_size % processes:
    raise ValueError(f'config.{what}={batch_size} is not divisible by the {processes} '
                     f'processes; each process reads an equal share.')
  if dp % processes:
    raise ValueError(
        f'The data-parallel size {dp} is not a multiple of the {processes} processes, so '
        f'processes would have to read identical rows; give the batch axes '
        f'{axes} at least one way per process.')
  if processes > 1:
    needed = _rows_per_process(batch_size, mesh, rules)
    wrong = {p: n for p, n in needed.items() if n != batch_size // processes}
    if wrong:
      process, rows = next(iter(wrong.items()))
      raise ValueError(
          f'The batch axes {axes} do not split the batch between the {processes} '
          f'processes: the devices of process {process} hold {rows} rows of each batch of '
          f'config.{what}={batch_size}, but it reads {batch_size // processes}. Fix: put '
          "the mesh axis that spans processes (normally 'data') among the batch axes, e.g. "
          "('batch', ('data', 'fsdp')) in config.sharding_rules.")
  return batch_size // processes


def _rows_per_process(batch_size: int, mesh: Mesh, rules) -> dict:
  """{process: how many distinct rows of a global batch its devices hold}; each must be
  what the process reads (jax.make_array_from_process_local_data fails on the first batch
  otherwise, after the run has started)."""
  spans = {}
  for device, index in batch_sharding(mesh, rules).devices_indices_map((batch_size,)).items():
    spans.setdefault(device.process_index, set()).add(index[0].indices(batch_size)[:2])
  return {p: sum(stop - start for start, stop in rows) for p, rows in spans.items()}


def host_batch_to_global(batch: dict, mesh: Mesh, global_batch_size: int, rules,
                         batch_axis: int = 0) -> dict:
  """Per-process numpy batches (this process's rows along `batch_axis`) -> one global
  jax.Array per feature, split over the batch axes; axes before `batch_axis` (GLUE's
  stacked seeds) stay whole."""
  spec = PartitionSpec(*(None,) * batch_axis, *batch_sharding(mesh, rules).spec)

  def to_global(x):
    x = np.asarray(x)
    shape = x.shape[:batch_axis] + (global_batch_size,) + x.shape[batch_axis + 1:]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, shape)
  return jax.tree.map(to_global, batch)
