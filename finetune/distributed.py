"""Multi-process training (DDP) on torch.distributed, launched by torchrun or by `trainer.nproc`.

`World` says which process this is. Everything that talks to other ranks lives here, and each
operation is a no-op for one process, so the loop reads the same with one rank or many.
Small collectives use CPU tensors: with the `cpu:gloo,cuda:nccl` backend they go through gloo,
which fails at once (instead of hanging) when a peer process dies.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from finetune.errors import ConfigError, FinetuneError, TrainingError

log = logging.getLogger(__name__)

RUN_DIR_KEY = "finetune/run_dir"
RANK_LOG_FORMAT = "[rank{rank}] %(levelname)s: %(message)s"
STORE_TIMEOUT = timedelta(minutes=30)  # how long ranks wait for rank 0 to choose the run directory
JOIN_GRACE_S = 5.0  # for workers to exit on their own after rank 0 stopped, before they are killed


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    # ---- collectives (no-ops for one process) ---------------------------------------------
    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM in place (on the tensor's own device); returns it."""
        if self.is_distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def max_(self, values: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank."""
        if not self.is_distributed:
            return flag
        return bool(self.max_(torch.tensor([int(flag)], dtype=torch.int32)).item())

    def gather(self, obj: Any) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.is_distributed:
            return [obj]
        gathered = [None] * self.size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere: every rank then evaluates the model
        rank 0 saves. DDP syncs buffers only at the start of each training forward."""
        if not self.is_distributed:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    def in_sync(self, model: nn.Module, extra: dict[str, torch.Tensor] | None = None) -> bool | None:
        """Whether every rank holds bit-identical parameters (and `extra` tensors, e.g. the EMA's
        averages; None for one process): each rank reduces them to two integers and all ranks
        compare their MIN and MAX."""
        if not self.is_distributed:
            return None
        digest = torch.tensor(parameter_digest(model, extra), dtype=torch.int64)
        low, high = digest.clone(), digest.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(torch.equal(low, high))

    # ---- the model wrapper ----------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
        """The module to run training forwards through: DDP over `model` under DDP, else `model`.

        DDP registers the parameters that require grad when it is built, so it is rebuilt after
        every policy.unfreeze. Files keep the bare model's names: callers keep `model` itself
        for state_dict, audits and evaluation."""
        if not self.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )


SINGLE = World()


def parameter_digest(model: nn.Module, extra: dict[str, torch.Tensor] | None = None) -> list[int]:
    """Two int64s over all parameters' bit patterns: their sum, and a sum weighted by position
    (so swapped tensors differ too). Exact: any changed bit of any element changes the sum."""
    from finetune.audit import checksums

    sums = [*checksums(dict(model.named_parameters())).values(), *checksums(extra or {}).values()]  # each on its device
    plain = sum(sums)
    weighted = sum((i + 1) * s for i, s in enumerate(sums))
    return [_wrap_int64(plain), _wrap_int64(weighted)]


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


class StopVote:
    """All ranks stop at the same step when any of them got SIGINT/SIGTERM.

    Each step, every rank adds its flag to an asynchronous all-reduce that completes during the
    next step, so the answer arrives one step late but nobody waits for it. `settle` votes
    synchronously (at epoch ends)."""

    def __init__(self, world: World):
        self.world = world
        self._flag: torch.Tensor | None = None
        self._work = None

    def poll(self, local: bool) -> bool:
        if not self.world.is_distributed:
            return local
        agreed = self._collect()
        self._flag = torch.tensor([int(local)], dtype=torch.int32)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        return agreed

    def settle(self, local: bool) -> bool:
        if not self.world.is_distributed:
            return local
        pending = self._collect()
        return self.world.any(local) or pending

    def close(self) -> None:
        self._collect()

    def _collect(self) -> bool:
        if self._work is None:
            return False
        self._work.wait()
        self._work = None
        return bool(self._flag.item())


# ---- process group lifetime -----------------------------------------------------------------


def backend_for(device_type: str) -> str:
    # CUDA tensors through NCCL; the small CPU collectives above always through gloo.
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def current_world() -> World:
    """This process's place in an initialised process group (torchrun), else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def torchrun_world() -> World | None:
    """The world torchrun describes in the environment, or None for a plain (one-process) launch."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or "RANK" not in os.environ:
        return None
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(world: World) -> None:
    """Join the process group torchrun set up (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE). This runs
    before the config is composed, so the backend follows the machine (the same on every rank):
    NCCL stays unused, and is never initialised, when trainer.device=cpu."""
    cuda = torch.cuda.is_available()
    if cuda and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend_for("cuda" if cuda else "cpu"), rank=world.rank, world_size=world.size)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, device: torch.device) -> torch.device:
    """Under DDP on CUDA each rank takes the GPU of its local rank."""
    if world.is_distributed and device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {world.local_rank} has no GPU: {torch.cuda.device_count()} visible on this node.",
                              "start at most one process per GPU (--nproc_per_node / trainer.nproc), or set trainer.device=cpu")
        return torch.device("cuda", world.local_rank)
    return device


# ---- one run directory for all ranks (torchrun) --------------------------------------------


def _store() -> dist.TCPStore:
    """A client of the rendezvous store torchrun's process group uses (MASTER_ADDR:MASTER_PORT)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=STORE_TIMEOUT)


def _run_dir_key() -> str:
    # A restarted torchrun attempt must not see the directory of the previous one.
    return f"{RUN_DIR_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def announce_run_dir(run_dir: str | None) -> None:
    """Rank 0: tell the other ranks the run directory Hydra chose ('' if it stopped before one)."""
    store, key = _store(), _run_dir_key()
    if run_dir is not None or not store.check([key]):
        store.set(key, run_dir or "")


def wait_for_run_dir() -> str:
    """Ranks > 0: the run directory rank 0 announced ('' when rank 0 stopped before a run)."""
    return _store().get(_run_dir_key()).decode()


def follower_overrides(run_dir: str) -> list[str]:
    """Hydra overrides for ranks > 0: rank 0's directory (reserved by it, not again), no .hydra
    files, and warnings only, to stderr, marked with the rank."""
    quoted = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    return [f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null", "hydra/job_logging=finetune_rank"]


# ---- trainer.nproc: spawn the workers from one composed config ------------------------------
#
# Workers are plain `python` subprocesses, not multiprocessing children: they work the same from
# a sweep launcher's worker (joblib's loky workers cannot start multiprocessing children) and
# never re-import the caller's main module. Each reads its target and arguments, pickled, from a
# file in a private temporary directory, and reports a failure in another file there.


def worker_threads(nproc: int) -> int:
    """Torch threads per process: this process's share of the cores (torch's default, or what a
    parallel sweep launcher gave the job) split between its N ranks, so they do not oversubscribe."""
    return max(1, torch.get_num_threads() // nproc)


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    error_file: Path

    @property
    def name(self) -> str:
        return f"rank {self.rank}"


def spawn(target: Callable[..., Any], nproc: int, device_type: str, *args: Any) -> Any:
    """Run `target(world, *args)` on `nproc` ranks: this process is rank 0 (so it writes into the
    Hydra job's run directory, with the job's logging and signal handling), the others are new
    processes. Returns rank 0's result. A worker's error comes back as one FinetuneError."""
    if dist.is_available() and dist.is_initialized():
        raise ConfigError(f"trainer.nproc={nproc} inside a process group that already exists (torchrun?).",
                          "use either torchrun --nproc_per_node=N or trainer.nproc=N, not both")
    if device_type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"trainer.nproc={nproc} but only {torch.cuda.device_count()} CUDA device(s) are visible.",
                          f"set trainer.nproc to at most {torch.cuda.device_count()}, or trainer.device=cpu")
    store = dist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    threads = worker_threads(nproc) if device_type == "cpu" else torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="finetune-ranks-") as scratch:
        workers = [_start_worker(target, args, World(rank, nproc, rank), store.port, device_type, threads, Path(scratch))
                   for rank in range(1, nproc)]
        torch.set_num_threads(threads)
        try:
            _wait_until_ready(store, workers)
            if device_type == "cuda":
                torch.cuda.set_device(0)
            dist.init_process_group(backend_for(device_type), rank=0, world_size=nproc, store=store)
            try:
                return target(World(0, nproc, 0), *args)
            except FinetuneError:
                raise
            except Exception as exc:  # a peer died under a collective: report the peer's reason
                _join(workers, grace=JOIN_GRACE_S)
                raise _worker_failure(workers) or exc
        finally:
            try:
                teardown()
            except Exception as exc:  # a group broken by the error being raised
                log.debug("process group teardown: %s", exc)
            _join(workers, grace=JOIN_GRACE_S)
            torch.set_num_threads(previous_threads)
            late = _worker_failure(workers)
            if late is not None and sys.exc_info()[0] is None:
                log.warning("after rank 0 finished: %s", late.problem)


def _start_worker(target, args, world: World, port: int, device_type: str, threads: int, scratch: Path) -> _Worker:
    error_file, spec_file = scratch / f"rank{world.rank}.error", scratch / f"rank{world.rank}.spec"
    spec = pickle.dumps({"target": target, "args": args, "world": world, "port": port, "device_type": device_type,
                         "threads": threads, "error_file": str(error_file)})
    spec_file.write_bytes(pickle.dumps((list(sys.path), spec)))  # the path first: unpickling may need it
    package_root = str(Path(__file__).resolve().parent.parent)
    bootstrap = f"import sys; sys.path.insert(0, {package_root!r}); from finetune.distributed import worker_main; worker_main()"
    proc = subprocess.Popen([sys.executable, "-c", bootstrap, str(spec_file)], stdin=subprocess.DEVNULL)
    return _Worker(world.rank, proc, error_file)


def _wait_until_ready(store, workers: list[_Worker]) -> None:
    """Until every worker has reached the store: one that dies while starting (say, an import
    error) would otherwise leave rank 0 waiting for it."""
    keys = [f"ready/{worker.rank}" for worker in workers]
    while not store.check(keys):
        for worker in workers:
            if worker.proc.poll() is not None:
                raise _worker_failure(workers) or TrainingError(
                    f"{worker.name} exited with code {worker.proc.returncode} while starting.",
                    "see its output above")
        time.sleep(0.02)


def _join(workers: list[_Worker], grace: float) -> None:
    deadline = time.monotonic() + grace
    for worker in workers:
        try:
            worker.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for worker in workers:
        if worker.proc.poll() is None:  # stuck in a collective whose peer is gone
            worker.proc.kill()
            worker.proc.wait()


def _worker_failure(workers: list[_Worker]) -> FinetuneError | None:
    """The first error a worker reported (or how it died), as one FinetuneError."""
    reported = [pickle.loads(w.error_file.read_bytes()) for w in workers if w.error_file.exists()]
    if reported:
        rank, kind, problem, fix = sorted(reported)[0]
        if kind is not None:
            from finetune import errors as error_types

            error_type = getattr(error_types, kind, FinetuneError)
            if not (isinstance(error_type, type) and issubclass(error_type, FinetuneError)):
                error_type = FinetuneError
            return error_type(f"rank {rank}: {problem}", fix)
        return TrainingError(f"rank {rank} failed: {problem.strip().splitlines()[-1]}",
                             f"see rank {rank}'s traceback above ([rank{rank}]); rerun the same command to resume "
                             "from checkpoints/last.pt once it is fixed")
    for worker in workers:
        code = worker.proc.returncode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            return TrainingError(f"{worker.name} was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else ""),
                                 "rerun the same command to resume from checkpoints/last.pt")
    return None


def worker_main() -> None:
    """Entry point of a spawned rank: read what to run (argv[1]), join the group, run it."""
    sys.path[:], spec = pickle.loads(Path(sys.argv[1]).read_bytes())
    spec = pickle.loads(spec)
    world: World = spec["world"]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=RANK_LOG_FORMAT.format(rank=world.rank), force=True)
    torch.set_num_threads(spec["threads"])
    error_file = Path(spec["error_file"])
    try:
        if spec["device_type"] == "cuda":
            torch.cuda.set_device(world.local_rank)
        store = dist.TCPStore("127.0.0.1", spec["port"], world.size, is_master=False, timeout=STORE_TIMEOUT)
        store.set(f"ready/{world.rank}", "1")
        dist.init_process_group(backend_for(spec["device_type"]), rank=world.rank, world_size=world.size, store=store)
        result = spec["target"](world, *spec["args"])
    except FinetuneError as exc:
        error_file.write_bytes(pickle.dumps((world.rank, type(exc).__name__, exc.problem, exc.fix)))
        _exit_now(exc.exit_code)
    except KeyboardInterrupt:
        _exit_now(130)
    except BaseException:  # not a user error: its traceback is worth printing
        text = traceback.format_exc()
        print(f"[rank{world.rank}] {text}", file=sys.stderr, flush=True)
        error_file.write_bytes(pickle.dumps((world.rank, None, text, None)))
        _exit_now(1)
    teardown()
    interrupted = isinstance(result, dict) and result.get("status") == "interrupted"
    sys.exit(int(result.get("exit_code") or 130) if interrupted else 0)


def _exit_now(code: int) -> None:
    """Exit without tearing down a process group that an error left in the middle of a collective
    (its destructor can abort the process); the kernel closes its sockets, which frees the peers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
