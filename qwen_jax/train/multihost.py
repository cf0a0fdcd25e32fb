"""Running `qwen-jax train` as one of several processes (TPU pod hosts, GPU nodes, local processes).

JAX's multi-controller runtime does the work: `jax.distributed.initialize` joins the processes
into one set of global devices, every process runs the same programs in the same order, and a
global batch is assembled from the rows each process holds (`global_array`). This module adds
what the trainer needs on top:

- `initialize`: join a run described by flags / environment variables, or one that JAX detects
  (Cloud TPU, SLURM and Open MPI with more than one task); otherwise stay single-process.
- `all_or_none`: a setup phase that fails on one process fails on all of them with the same error
  (so a bad data line seen by process 1 ends every process with exit status 2, not a hang).
- `preemption_requested`: every process learns at the same step that any of them got SIGTERM
  (JAX's preemption sync point), so all save the same checkpoint.
- `gather_objects`: small host values (GRPO rollouts and rewards) of every process, on every process.
- `ProcessLocalView`: this process's devices as a mesh of their own, and the trainer's globally
  sharded arrays seen on it (what a process-local `qwen_jax.Engine` runs on for GRPO rollouts).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, Sharding

from qwen_jax.errors import ConfigError, LaunchError, QwenJaxError, UsageError

# The variables JAX documents for its coordinator plus the two it leaves to the launcher.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"

# Set on an exception that every process raised together (see `all_or_none`): the process may
# exit normally. Any other exception in a multi-process run ends the process at once, because
# the normal exit would wait at JAX's shutdown barrier for processes that are still training.
RAISED_ON_ALL = "raised_on_all_processes"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _detected_cluster() -> str | None:
    """The cluster JAX can initialize itself from, when it launched more than one process.

    Single-task SLURM / MPI jobs are left alone on purpose: JAX would then give the one process
    a single GPU (its local rank), not all the GPUs of the node.
    """
    slurm_tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    if slurm_tasks and slurm_tasks.isdigit() and int(slurm_tasks) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    mpi_size = os.environ.get("OMPI_COMM_WORLD_SIZE")
    if mpi_size and mpi_size.isdigit() and int(mpi_size) > 1:
        return "Open MPI"
    if importlib.util.find_spec("libtpu") is not None:
        return "Cloud TPU"  # every TPU VM host runs one process; a one-host slice is a 1-process run
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
) -> bool:
    """Join a multi-process run if this process was launched as part of one; True if it did.

    Explicit settings (arguments, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID /
    JAX_LOCAL_DEVICE_IDS) win; without them, a cluster JAX detects (see `_detected_cluster`) is
    joined with `jax.distributed.initialize()`. With neither, the process runs alone, untouched.
    Must run before anything touches a JAX device.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
        try:
            local_device_ids = [int(i) for i in os.environ[ENV_LOCAL_DEVICE_IDS].split(",")]
        except ValueError:
            raise LaunchError(
                f"{ENV_LOCAL_DEVICE_IDS}={os.environ[ENV_LOCAL_DEVICE_IDS]!r}: expected e.g. 0,1,2,3"
            ) from None
    explicit = (coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        return True
    # Cross-process collectives on CPU (local tries, CI); the default on recent JAX, set for older ones.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(value is None for value in explicit):
        cluster = _detected_cluster()
        if cluster is None:
            if local_device_ids is not None:
                raise LaunchError(
                    "local device ids apply to multi-process runs only (a single process on some "
                    "GPUs: CUDA_VISIBLE_DEVICES)"
                )
            return False
        try:
            jax.distributed.initialize(local_device_ids=local_device_ids)
        except ValueError as e:  # e.g. libtpu installed on a machine that is no TPU VM
            if cluster == "Cloud TPU":
                return False
            raise LaunchError(f"could not join the {cluster} run: {e}") from None
    else:
        if None in explicit:
            raise LaunchError(
                "a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and "
                "--process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise LaunchError(f"process id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise LaunchError(f"coordinator {coordinator!r}: expected HOST:PORT")
        try:
            jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
        except (RuntimeError, ValueError) as e:  # JAX's runtime errors (unreachable coordinator, timeout) included
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LaunchError(
                f"could not join the run at {coordinator} as process {process_id} of {num_processes}: {reason}"
            ) from None
    if log is not None:
        log(
            f"joined a {jax.process_count()}-process run as process {jax.process_index()} "
            f"({jax.local_device_count()} of {jax.device_count()} devices are local)"
        )
    return True


# --------------------------------------------------------------------------- who does what
def is_primary() -> bool:
    """The process that writes the run's single-copy outputs (metrics, TensorBoard, plots)."""
    return jax.process_index() == 0


def process_tag(message: str) -> str:
    """A log line, prefixed with the process index on every process but the primary."""
    if jax.process_count() == 1 or is_primary():
        return message
    return f"[process {jax.process_index()}] {message}"


def exit_now(status: int) -> None:
    """End this process at once, skipping JAX's shutdown barrier (which would wait for processes
    that are still training); the others then fail within JAX's heartbeat timeout."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing to wait for alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- errors
_MESSAGE_BYTES = 1024
_OK, _USER_ERROR, _OTHER_ERROR = 0, 1, 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors in the user's input (one line, exit status 2), as the command line reports them."""
    return QwenJaxError, FileNotFoundError


@contextlib.contextmanager
def all_or_none(what: str) -> Iterator[None]:
    """Run a block on every process; if it raised anywhere, raise on every process.

    The process whose block failed re-raises its own exception; the others raise a UsageError (or
    RuntimeError for a non-user error) with the same message and the failing process's index.
    Either way the exception is marked `raised_on_all_processes`, so every process exits with the
    same status instead of some of them waiting in a collective for one that is gone.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # every kind must be shared, or the other processes hang
        error = e
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    status = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    if error is not None:
        status[0] = _USER_ERROR if isinstance(error, user_error_types()) else _OTHER_ERROR
        encoded = f"{error}".encode()[:_MESSAGE_BYTES]
        status[1 : 1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    statuses = np.asarray(multihost_utils.process_allgather(status))
    failed = [i for i in range(len(statuses)) if statuses[i, 0] != _OK]
    if not failed:
        return
    if error is not None:
        setattr(error, RAISED_ON_ALL, True)
        raise error
    first = statuses[failed[0]]
    message = bytes(first[1:]).rstrip(b"\0").decode("utf-8", "replace")
    kind = UsageError if first[0] == _USER_ERROR else RuntimeError
    shared = kind(f"{message} (process {failed[0]}, while {what})")
    setattr(shared, RAISED_ON_ALL, True)
    raise shared


def check_shared_directory(path: str) -> None:
    """Refuse to run when `path` is not one directory for every process (checkpoints, the token
    cache and the final model are written by all processes together into one place)."""
    if jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(np.int64(np.random.default_rng().integers(1 << 62))))
    probe = os.path.join(path, f".shared-directory-check-{token}")
    if is_primary():
        with open(probe, "w") as f:
            f.write("written by process 0\n")
    barrier("qwen_jax_shared_directory_written")
    with all_or_none("checking the output directory"):
        if not os.path.exists(probe):
            raise LaunchError(
                f"{path} is not shared between the processes: --out must be on a filesystem that "
                "every host sees (NFS, Filestore, a gcsfuse-mounted bucket)"
            )
    barrier("qwen_jax_shared_directory_checked")
    if is_primary():
        os.remove(probe)


# --------------------------------------------------------------------------- global batches
def process_rows(sharding: Sharding, global_shape: Sequence[int], axis: int) -> np.ndarray:
    """Indices along `axis` that this process's devices hold, ascending (all of them if the axis is
    replicated). `jax.make_array_from_process_local_data` expects exactly these, in this order."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        start, stop, step = index[axis].indices(global_shape[axis])
        rows.update(range(start, stop, step))
    return np.asarray(sorted(rows), np.int64)


def global_array(sharding: Sharding, global_shape: Sequence[int], local_data: np.ndarray) -> jax.Array:
    """One global array from this process's rows (`local_data`, as `process_rows` ordered them)."""
    return jax.make_array_from_process_local_data(sharding, local_data, tuple(global_shape))


def gather_objects(value: Any) -> list[Any]:
    """`value` from every process, in process order, on every process (alone: `[value]`).

    For small host data (a GRPO step's rollouts and rewards): it travels pickled through one
    all-gather of bytes, padded to the longest process's."""
    if jax.process_count() == 1:
        return [value]
    payload = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(payload.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, : sizes[i]].tobytes()) for i in range(len(sizes))]


# --------------------------------------------------------------------------- process-local arrays
def _process_block(mesh: Mesh, process: int) -> tuple[slice, ...] | None:
    """The slices of `mesh.devices` that hold exactly the devices of `process`, if they form a block."""
    owners = np.vectorize(lambda d: d.process_index)(mesh.devices)
    where = np.argwhere(owners == process)
    low, high = where.min(axis=0), where.max(axis=0) + 1
    if int(np.prod(high - low)) != len(where):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


class ProcessLocalView:
    """This process's devices as a mesh of their own, and trees of global arrays seen on that mesh.

    A program on the local mesh runs on this process alone, without the others (a GRPO rollout,
    whose requests differ per process, on a process-local `qwen_jax.Engine`). `local(tree)` turns
    each global array of `mesh` into an array of the local mesh with the same values and the same
    `PartitionSpec`:

    - without a copy when this process's shards of the array already make the whole array in
      that layout: the array is replicated across processes (e.g. parameters on `fsdp` and `tensor`
      within a host, with `data` across hosts);
    - otherwise with one all-gather across processes into a copy laid out like that (parameters
      sharded over devices of several processes: every process then holds the whole array, split
      over its own devices only).

    Where the processes' devices form equal blocks of the mesh, the local mesh is this process's
    block (same axis names and sizes within it); otherwise its devices all on `fsdp`.
    """

    def __init__(self, mesh: Mesh):
        owners = {device.process_index for device in mesh.devices.flat}
        if len(owners) != jax.process_count():
            raise ConfigError(
                f"the mesh {dict(mesh.shape)} has devices of {len(owners)} of the {jax.process_count()} processes: "
                "every process needs some of its devices to roll out on (a mesh of all devices)"
            )
        blocks = [_process_block(mesh, p) for p in range(jax.process_count())]
        grids = [mesh.devices[b] for b in blocks] if None not in blocks else []
        if not grids or len({g.shape for g in grids}) != 1:
            by_process: dict[int, list[jax.Device]] = {}
            for device in sorted(mesh.devices.flat, key=lambda d: d.id):
                by_process.setdefault(device.process_index, []).append(device)
            shape = [len(by_process[jax.process_index()]) if name == "fsdp" else 1 for name in mesh.axis_names]
            grids = [np.asarray(by_process[p], dtype=object).reshape(shape) for p in sorted(by_process)]
        self.global_mesh = mesh
        self.mesh = Mesh(grids[jax.process_index()], mesh.axis_names)
        # The layout a gathered copy takes: each process's grid, the processes along a new outer axis.
        self._gathered_mesh = Mesh(np.stack(grids), ("processes", *mesh.axis_names))

    def local_sharding(self, array: jax.Array) -> NamedSharding:
        """The local mesh's sharding with the array's `PartitionSpec`."""
        return NamedSharding(self.mesh, array.sharding.spec)

    def _is_local(self, array: jax.Array) -> bool:
        """Whether this process's shards of `array` are the whole array in the local layout."""
        local = self.local_sharding(array).devices_indices_map(array.shape)
        shards = {shard.device: shard.index for shard in array.addressable_shards}
        return shards.keys() == local.keys() and all(local[device] == index for device, index in shards.items())

    def needs_copy(self, tree: Any) -> bool:
        """Whether `local(tree)` copies (gathers) any of its arrays."""
        return not all(self._is_local(x) for x in jax.tree.leaves(tree))

    def local(self, tree: Any) -> Any:
        """`tree`'s global arrays (NamedSharding on the view's mesh) as arrays of the local mesh;
        see the class docstring for when that copies. Call on every process together (a copy is a
        collective)."""
        leaves, structure = jax.tree.flatten(tree)
        gather = [i for i, x in enumerate(leaves) if not self._is_local(x)]
        if gather:
            # device_put, not a jitted identity: it also reshards between meshes whose device orders differ.
            targets = [NamedSharding(self._gathered_mesh, leaves[i].sharding.spec) for i in gather]
            for i, array in zip(gather, jax.device_put([leaves[i] for i in gather], targets)):
                leaves[i] = array
        local = [
            jax.make_array_from_single_device_arrays(
                x.shape, self.local_sharding(x), [shard.data for shard in x.addressable_shards]
            )
            for x in leaves
        ]
        return jax.tree.unflatten(structure, local)


# --------------------------------------------------------------------------- signals
class StopSignals:
    """SIGTERM / SIGINT during training -> stop after a step, the same step on every process.

    Alone (no `jax.distributed`), Python handlers note the signal and training stops after the
    current step. In a distributed run JAX's preemption service owns SIGTERM: a SIGTERM to any
    process is propagated to all, and `reached_preemption_sync_point(step)` turns True on all of
    them at the same step. SIGINT is routed into the same path (it re-raises itself as SIGTERM),
    so Ctrl-C on one host also stops every host at one step.
    """

    def __init__(self):
        self.synchronized = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        def note(signum, frame):
            self.received.append(signum)

        def forward_to_preemption_service(signum, frame):
            self.received.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

        handlers = (
            {signal.SIGINT: forward_to_preemption_service}
            if self.synchronized
            else {signal.SIGTERM: note, signal.SIGINT: note}
        )
        for signum, handler in handlers.items():
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def stop_after(self, step: int) -> bool:
        """Whether to stop now that `step` steps are done (call after every step, on every process)."""
        if self.synchronized:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self.received)

    @property
    def exit_status(self) -> int:
        """128 + signal: SIGINT if this process got one, else SIGTERM (its own or another host's)."""
        return 128 + (signal.SIGINT if signal.SIGINT in self.received else signal.SIGTERM)

    @property
    def name(self) -> str:
        """The signal that stopped the run, as `exit_status` counts it."""
        return "SIGINT" if signal.SIGINT in self.received else "SIGTERM"
