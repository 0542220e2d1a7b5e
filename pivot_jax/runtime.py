"""Process set-up that must happen before JAX starts its backends: XLA flags and memory for the CPU.

XLA:CPU runs convolutions either with its own Eigen kernels or, by default in this jaxlib, through a
YNNPACK library fusion. For the small-channel convolutions of CIFAR ResNets the YNNPACK path is
slower, forward and backward (docs/performance.md measures it), so on the CPU pivot_jax turns it off.
The flag is read only by the CPU backend; accelerators ignore it. A user's own XLA_FLAGS win.

XLA:CPU also allocates each execution's temporaries (about 300 MB for a ResNet-20 step at batch 128)
with malloc and frees them at its end; glibc serves such a block with a fresh mmap every time, so
every step pays ~75,000 page faults to touch its memory again (a fifth of the step here).
`keep_freed_memory` makes glibc keep freed memory for reuse instead.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import logging
import os
import re
import sys
import threading

from pivot_jax.errors import ConfigError, DistributedError, UserError, first_line

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def configure_cpu_defaults() -> None:
    """Adds `CPU_XLA_FLAGS` to XLA_FLAGS, unless XLA_FLAGS already sets that flag, and sizes oneDNN's
    OpenMP thread team. Call it before the first JAX computation (flags are read when the backend
    starts, OMP_NUM_THREADS when oneDNN loads).

    With N fake CPU devices, XLA runs N convolutions at once (one per device); each gets cores / N
    OpenMP threads, so that they do not oversubscribe the cores (docs/performance.md measures it).
    A user's own settings win.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        name = flag.split("=")[0]
        if name not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    devices = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if devices and int(devices.group(1)) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(devices.group(1)))))
    if _cpu_is_the_backend() and os.environ.get("PIVOT_JAX_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()


# Accelerator plugins: where one is installed, JAX computes there and host memory is left as it is.
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def _cpu_is_the_backend() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse: one arena, no mmap for large blocks, no trimming.

    Without this every XLA:CPU execution maps its temporaries anew and faults every page of them in
    (threads other than the main one allocate from their own arenas, which map any block past 64 MB
    however M_MMAP_MAX is set, hence the single arena). The cost is that the process keeps its peak
    memory (about 2 GB instead of 1 GB for a ResNet-20 step at batch 128), and that with one arena
    XLA's multi-threaded compilation takes about 5 s longer at start-up: a ResNet-20 step saves ~70 ms,
    so a run of more than ~100 steps gains (`PIVOT_JAX_KEEP_FREED_MEMORY=0` turns it off; the test
    suite, which starts ~100 short runs, does). Returns whether it was
    applied: not where the C library is not glibc, nor when the user tunes glibc's malloc already
    (GLIBC_TUNABLES with malloc settings, or MALLOC_*_ variables), which wins.
    """
    if sys.platform != "linux" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
        return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# JAX's names for the environments its cluster detection recognises, as the log says them.
CLUSTER_NAMES = {"gcetpu": "a TPU VM slice (GCE metadata server)", "gketpu": "a TPU slice on GKE",
                 "slurm": "SLURM", "ompi": "Open MPI", "k8s": "Kubernetes"}


def detect_cluster():
    """The cluster environment that JAX's own detection recognises in this process's environment (a TPU
    VM slice through its metadata server, GKE, SLURM, Open MPI, Kubernetes), or None.

    It is the detection `jax.distributed.initialize()` runs when given no addresses; JAX has no public
    name for it, so it is read from `jax._src.clusters`, in JAX's own order. Opt-in methods (mpi4py)
    are left out, as JAX leaves them out.
    """
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        try:
            if env.is_env_present():
                return env
        except Exception as error:  # noqa: BLE001  (a metadata server that answers nonsense)
            from absl import logging

            logging.warning("cluster detection %s failed: %s", env.name, first_line(error))
    return None


def _local_device_ids_from_env() -> list[int] | None:
    """JAX_LOCAL_DEVICE_IDS (e.g. "0,1,2,3"), which jax.distributed reads too: the launcher's word on
    which of the host's devices this process drives (launch/slurm/train.sbatch sets it per node)."""
    value = os.environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    return [int(x) for x in value.split(",")] if value else None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_seconds: int = 300) -> str | None:
    """Joins a multi-process run: explicitly with a coordinator address (local runs, any cluster), or
    wherever JAX's cluster detection recognises the environment (`detect_cluster`). A single process
    needs nothing. Returns how the run was joined (for the log and tests), or None.

    On a cluster every process must join: without the distributed client, preemption notices never
    reach the run (`CheckpointManager.reached_preemption` is always False), so a preempted pod would
    lose everything since its last periodic checkpoint.

    A peer that does not show up within `timeout_seconds`, or stops sending heartbeats for that long,
    ends the run with an error instead of a hang.
    """
    import jax
    from absl import logging

    local_device_ids = _local_device_ids_from_env()
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise DistributedError("--coordinator_address needs --num_processes and --process_id as well")
        where = coordinator_address
    else:
        cluster = detect_cluster()
        if cluster is None:
            return None
        from jax._src import clusters

        name = CLUSTER_NAMES.get(cluster.name, cluster.name)
        try:
            coordinator_address, num_processes, process_id, local_device_ids = (
                clusters.ClusterEnv.auto_detect_unset_distributed_params(
                    None, None, None, local_device_ids, cluster.name, timeout_seconds))
        except Exception as error:  # noqa: BLE001  (an environment JAX recognised but cannot read)
            raise DistributedError(f"{name} was detected, but its environment could not be read: "
                                   f"{first_line(error)}") from None
        if num_processes == 1:
            logging.info("Cluster: %s, with this one process: no jax.distributed needed.", name)
            return name
        where = f"{name} (coordinator {coordinator_address})"
    logging.info("Process %s of %s joining %s; local devices %s; a peer missing for %d s ends the run.",
                 process_id, num_processes, where, "all" if local_device_ids is None else local_device_ids,
                 timeout_seconds)
    if process_id:
        _wait_for_coordinator(coordinator_address, process_id, timeout_seconds)
    # Past this point the runtime itself enforces the timeout: it aborts the process with a
    # DEADLINE_EXCEEDED message (it cannot be caught) if a peer never registers or stops responding.
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=timeout_seconds,
            heartbeat_timeout_seconds=timeout_seconds,
        )
    except Exception as error:  # the runtime raises several kinds; all mean the peers did not meet
        raise DistributedError(
            f"process {process_id} could not join {where} within {timeout_seconds} s: "
            f"{str(error).splitlines()[0][:300]}. Check that all {num_processes} processes were started with "
            "the same coordinator address."
        ) from None
    global _peer_watch
    _peer_watch = PeerWatch(jax.process_index(), jax.process_count(), silence_seconds=timeout_seconds / 2)
    _peer_watch.start()
    return where


def _wait_for_coordinator(address: str, process_id: int, timeout_seconds: int) -> None:
    """Waits until process 0's coordinator accepts connections, or raises a DistributedError."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5, timeout_seconds)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"process {process_id} could not reach the coordinator (process 0) at {address} within "
                    f"{timeout_seconds} s: {error}. Start process 0 with the same --coordinator_address, or "
                    "raise --distributed_timeout."
                ) from None
            time.sleep(0.5)


def define_distributed_flags() -> None:
    """The command-line flags of `initialize_distributed`, for the CLIs."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for runs that no launcher starts.")
    flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
    flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for a missing or silent peer.")


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in a command line, before absl parses it."""
    for index, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def define_config_flag(argv: list[str]) -> None:
    """`--config` for the tools that use a trained run (evaluate, predict, export): the config file
    when `--config=FILE` is given, else the config the run saved in `--workdir`'s config.json. Either
    way `--config.<field>=<value>` overrides apply."""
    from ml_collections import config_flags

    if _flag_value(argv, "config") is not None:
        config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py[:args]); default: the run's own.")
        return
    workdir = _flag_value(argv, "workdir")
    if workdir is None:
        sys.exit("error: --workdir is required (the run's directory)")
    from pivot_jax import workdirs

    try:
        saved = workdirs.saved_config(workdir)
    except UserError as error:
        sys.exit(f"error: {error}")
    config_flags.DEFINE_config_dict("config", saved, "The run's config (default: DIR/config.json).")


class _Lines:
    """tqdm's redraws as plain lines, for a log file (a redraw on a terminal is a carriage return)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str = "img"):
    """A tqdm progress bar for a wait of more than a few seconds (evaluation, the mean, calibration):
    redrawn on a terminal, a plain line every 30 s in a log file; process 0 alone shows it."""
    import jax
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=jax.process_index() != 0,
                file=sys.stderr if terminal else _Lines(sys.stderr), mininterval=0.5 if terminal else 30.0,
                dynamic_ncols=terminal, ascii=not terminal)


class Progress:
    """Where this process's run is, for the message that ends it when a peer is lost."""

    step: int | None = None  # the last step trained
    checkpoint: int | None = None  # the last step saved


class PeerWatch(threading.Thread):
    """Ends this process with one `error:` line when a peer process dies or goes silent mid-run.

    JAX's runtime notices a lost peer too, after `--distributed_timeout`, but it then aborts the process
    from C++ (a check failure and a thread dump, no word of which process or what to do). Here each
    process publishes a heartbeat in the coordination service's key-value store and watches the others';
    a peer silent for `silence_seconds` (half the runtime's timeout, so this comes first) ends this
    process saying which one, at which step, and how to resume. A process that finished its work says
    so (`finish`), so that its exit is not a loss. (The loss of process 0, which hosts the coordination
    service, the runtime itself reports at once, from C++: no Python code runs before it aborts.)
    """

    KEY = "pivot_jax/alive"
    DONE = "done"

    def __init__(self, process_id: int, num_processes: int, silence_seconds: float):
        super().__init__(name="pivot_jax peer watch", daemon=True)
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.process_id, self.num_processes = process_id, num_processes
        self.silence_seconds = silence_seconds
        self.period = min(5.0, silence_seconds / 5)
        self._finished = threading.Event()

    def run(self) -> None:
        import time

        beat, start = 0, time.monotonic()
        last_value: dict[int, str | None] = {}
        last_change = {i: start for i in range(self.num_processes) if i != self.process_id}
        while not self._finished.wait(self.period):
            beat += 1
            try:
                self.client.key_value_set(f"{self.KEY}/{self.process_id}", str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(f"{self.KEY}/"))
            except Exception:  # noqa: BLE001  (the coordinator is gone: the runtime ends the process)
                continue
            now = time.monotonic()
            for peer in last_change:
                value = values.get(f"{self.KEY}/{peer}")
                if value == self.DONE:
                    continue
                if value != last_value.get(peer):
                    last_value[peer], last_change[peer] = value, now
                elif now - last_change[peer] >= self.silence_seconds:
                    self._lost(f"process {peer} of {self.num_processes} died or stopped responding (no heartbeat "
                               f"for {self.silence_seconds:.0f} s)")

    def _lost(self, what: str) -> None:
        if self._finished.is_set():
            return
        step = "before the first step" if Progress.step is None else f"at step {Progress.step}"
        resume = ("the same command resumes from its last checkpoint" if Progress.checkpoint is None
                  else f"the same command resumes from the last checkpoint (step {Progress.checkpoint})")
        print(f"error: {what}, {step}; process {self.process_id} stops too. Once every process can run, "
              f"{resume}.", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread may wait in a collective for the lost peer forever

    def finish(self) -> None:
        """This process's work is done: peers no longer wait for its heartbeat, nor it for theirs."""
        self._finished.set()
        try:
            self.client.key_value_set(f"{self.KEY}/{self.process_id}", self.DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001  (the coordinator may have finished first)
            pass


_peer_watch: PeerWatch | None = None


def finish_peer_watch() -> None:
    if _peer_watch is not None:
        _peer_watch.finish()


def wait_for_lost_peer(error: BaseException) -> None:
    """Called with an unexpected error of a multi-process run: a collective fails at once when its peer
    dies ("Gloo all-reduce failed: ... Connection reset by peer"), before the watch can say so. Gives
    the watch its time to confirm the loss (it then ends the process with its one line); returns if
    it does not, for the caller to report `error` itself."""
    if _peer_watch is not None and not isinstance(error, UserError):
        _peer_watch.join(timeout=_peer_watch.silence_seconds + 2 * _peer_watch.period)


def initialize_from_flags() -> None:
    from absl import flags

    initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id,
                           flags.FLAGS.distributed_timeout)


class _QuietLibraries(logging.Filter):
    """Keeps Orbax's per-save INFO chatter out of the console; its warnings still show. Errors of its
    background threads show as one line: the exception reaches the run, which reports it itself."""

    def filter(self, record) -> bool:
        if record.pathname.endswith("xla_bridge.py") and record.levelno < logging.WARNING:
            return False  # "Unable to initialize backend 'tpu'" and the like, on machines without one
        if record.pathname.endswith("file_utils.py") and "Variant folder" in str(record.msg):
            # TFDS listing the folders of a data dir it does not use; shown with --verbosity=1.
            return logging.getLogger("absl").isEnabledFor(logging.DEBUG)
        if record.pathname.endswith("image_feature.py") and "OpenCV" in str(record.msg):
            return False  # TFDS recommends OpenCV for decoding; pivot_jax decodes with PIL on purpose
        if "/tensorflow/" in record.pathname and record.levelno < logging.WARNING:
            return False  # SavedModel writing's INFO lines (pivot_jax.export)
        if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
            return False  # a failed save's other writes, left behind after the run reported the failure
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno >= logging.ERROR and record.exc_info:
            record.msg, record.args = record.getMessage().splitlines()[0][:300], None
            record.exc_info = record.exc_text = None
        return record.levelno >= logging.WARNING


def _is_closed_loop_noise(exc_type, exc_value) -> bool:
    """TensorStore callbacks that fire after Orbax closed its event loop, when a save failed."""
    return exc_type is RuntimeError and str(exc_value) == "Event loop is closed"


def quiet_library_logs() -> None:
    """For the CLIs: the console shows the run's own progress and errors, not every library's INFO
    lines or the tracebacks that an error already reported leaves behind in library threads."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
    original_excepthook = sys.excepthook

    def excepthook(exc_type, exc_value, traceback):
        if not _is_closed_loop_noise(exc_type, exc_value):
            original_excepthook(exc_type, exc_value, traceback)

    sys.excepthook = excepthook
    original_unraisablehook = sys.unraisablehook

    def unraisablehook(unraisable):
        if not _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
            original_unraisablehook(unraisable)

    sys.unraisablehook = unraisablehook

    def thread_excepthook(args):
        # A library's worker thread that fails hands its error to the run, which reports it; the
        # console gets one line here instead of the thread's traceback.
        if args.exc_type is SystemExit or _is_closed_loop_noise(args.exc_type, args.exc_value):
            return
        name = args.thread.name if args.thread is not None else "?"
        print(f"warning: background thread {name} stopped: {args.exc_type.__name__}: {first_line(args.exc_value)}",
              file=sys.stderr)

    threading.excepthook = thread_excepthook


def _one_line(error: BaseException) -> str:
    """An exception's message on one line. Library messages can be multi-line, quoted twice, or hold
    a whole traceback as text (then its last line, the error itself, is what counts)."""
    text = str(error)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:
        last = lines[-1]
        name, sep, message = last.partition(": ")
        return message if sep and "." in name and " " not in name else last
    return " ".join(lines)


def _cause(error: BaseException) -> BaseException:
    """The first `UserError` in an exception's chain, else the exception itself."""
    seen = error
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


# What ml_collections raises while it loads a config file and applies `--config.<field>` overrides.
_CONFIG_LOADING_ERRORS = (AttributeError, KeyError, OSError, TypeError, ValueError)


def _config_loading_error(error: BaseException, name: str, argv: list[str]) -> str:
    """`--<name>: <what went wrong>`, naming the config file where the library names its own
    internal module for it (`config_config`)."""
    text = _one_line(_cause(error))
    if "has no attribute 'get_config'" in text:
        given = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
        filename = given[-1].partition(":")[0] if given else "the config file"
        text = (f"{filename} defines no get_config(arg=None), the function that returns the experiment's "
                "ConfigDict (see configs/mnist.py)")
    return f"--{name}: {text}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one `error:` line instead of a traceback for a bad flag or config."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, UserError) as error:
        sys.exit(f"error: {_one_line(_cause(error))}")
    except _CONFIG_LOADING_ERRORS as error:
        sys.exit(f"error: {_config_loading_error(error, 'config', argv)}")


def config_from_flags(name: str = "config"):
    """The `--config` flag's ConfigDict. ml_collections loads the file and applies the
    `--config.<field>` overrides on first access: a missing file or a mistyped field becomes a
    ConfigError with the library's suggestion, on one line."""
    from absl import flags

    try:
        config = getattr(flags.FLAGS, name)
        config.to_dict()  # a config that failed to load raises only when it is used
        return config
    except UserError:
        raise
    except _CONFIG_LOADING_ERRORS as error:
        raise ConfigError(_config_loading_error(error, name, sys.argv)) from None
