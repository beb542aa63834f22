"""Tensor parallelism: rank 0 lives in the engine's process and schedules; ranks 1..N-1 are worker processes, on
this machine or, with nnodes > 1, also on others (each started by `run_node`). Every step rank 0 broadcasts the
step's plan (one broadcast of a small pickled list); then every rank runs its shard of every layer, the
row-parallel layers all-reducing. gloo on CPU, NCCL on CUDA.

Rank 0 hosts the rendezvous (a TCPStore): the workers read the engine's config and its workspace's fingerprint
from it, every rank says there when its shard is loaded (the first collective waits for all), and a worker that
fails writes its error there and exits at once; its closed sockets make rank 0's pending collective fail, and rank 0
raises the worker's error instead of hanging. Idle, a health probe is a collective too (ping), so a node that
stopped shows at once."""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from lmcli.engine.config import EngineConfig, ParallelConfig, rank_device
from lmcli.engine.layers.parallel import TP
from lmcli.engine.model_runner import ModelRunner
from lmcli.errors import UserError
from lmcli.workspace import Workspace


def timeout() -> timedelta:
    """The backstop for a collective that never completes: 120 s (LMCLI_TP_TIMEOUT seconds, for tests). Idle, rank
    0 pings every quarter of it, so that a worker waiting for the next step never times out."""
    return timedelta(seconds=float(os.environ.get("LMCLI_TP_TIMEOUT", 120)))


def join_timeout() -> float:
    """Seconds for the nodes to join and for every rank to load its shard: 900 (torchrun's rendezvous default), or
    LMCLI_TP_JOIN_TIMEOUT."""
    return float(os.environ.get("LMCLI_TP_JOIN_TIMEOUT", 900))


def wait_keys(store, keys: list, failed, late: str) -> None:
    """Until the store holds every key, up to join_timeout() (then WorkerError: late, then the missing keys).
    failed(): the error of a rank that failed meanwhile, or None (raised at once)."""
    deadline = time.monotonic() + join_timeout()
    while not store.check(keys):
        error = failed()
        if error is not None:
            raise error
        if time.monotonic() > deadline:
            missing = [k for k in keys if not store.check([k])]
            raise WorkerError(f"{late} within {join_timeout():.0f} s (LMCLI_TP_JOIN_TIMEOUT): {', '.join(missing)}")
        time.sleep(0.05)


def wait_loaded(store, rank: int, size: int, failed) -> None:
    """Say this rank has loaded its shard and wait until every rank has: a node that loads slower than the others
    (a slower disk, a bigger shard) must not run into the first collective's timeout."""
    store.set(f"loaded/{rank}", "1")
    wait_keys(store, [f"loaded/{r}" for r in range(size)], failed, "not every rank loaded its shard")


def rank_error(store, size: int):
    """The first rank's error written to the store, as a WorkerError, or None."""
    for rank in range(size):
        if store.check([f"error/{rank}"]):
            return WorkerError(store.get(f"error/{rank}").decode())
    return None


BEAT = 2.0  # seconds between a joining worker's signs of life


class Heartbeat:
    """A worker's sign of life until it has joined and loaded: a counter in the store, on a connection of its own,
    that rank 0 watches (a node that dies then writes no error, and is no child of rank 0's)."""

    def __init__(self, addr: str, port: int, rank: int):
        self.done = threading.Event()
        store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=join_timeout()))

        def beat():
            while True:
                try:
                    store.add(f"alive/{rank}", 1)
                except Exception:  # rank 0 is gone
                    return
                if self.done.wait(BEAT):
                    return

        threading.Thread(target=beat, daemon=True).start()


class Silence:
    """Rank 0's watch over the other nodes' heartbeats: the ranks whose counter has not moved for timeout()."""

    def __init__(self, store, ranks):
        self.store, self.ranks, self.seen = store, list(ranks), {}

    def error(self):
        """A WorkerError for a silent rank that has not loaded its shard yet, or None."""
        now = time.monotonic()
        for r in self.ranks:
            if self.store.check([f"loaded/{r}"]):
                continue
            count = self.store.add(f"alive/{r}", 0)
            if self.seen.get(r, (None,))[0] != count:
                self.seen[r] = (count, now)
            elif count and now - self.seen[r][1] > timeout().total_seconds():
                return WorkerError(f"rank {r} on node {r // self.ranks[0]} stopped while the ranks were starting "
                                   f"(no sign of life for {timeout().total_seconds():.0f} s)")
        return None


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed."""


def _init(rank: int, size: int, store, device: str, local_ranks: int) -> None:
    """Join the group; device: this rank's own (rank_device)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    # each rank gets its share of its machine's cores, so ranks do not fight over them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout())


def check_gpus(device: str, parallel: ParallelConfig) -> None:
    """A GPU a rank on this machine, from the one asked for: else a UserError now, not a worker's 'invalid device
    ordinal'."""
    if device == "cpu":
        return
    last, seen = rank_device(device, parallel.local_ranks - 1), torch.cuda.device_count()
    if int(last[5:]) >= seen:
        each = f" ({parallel.local_ranks} on each of {parallel.nnodes} nodes)" if parallel.nnodes > 1 else ""
        raise UserError(f"--tp {parallel.tp}{each} on {device} needs a GPU a rank ({rank_device(device, 0)} to "
                        f"{last}); torch sees {seen}")


def _ping(device) -> None:
    """A collective every rank answers: it fails if one is gone."""
    dist.all_reduce(torch.zeros(1, device=device))


def worker_main(rank: int, addr: str, port: int, workspace: str) -> None:
    """A tensor-parallel worker: reads the config from rank 0's store, joins the group, loads its shard from its own
    machine's workspace, then runs every step rank 0 broadcasts."""
    try:
        store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=join_timeout()))
        heartbeat = Heartbeat(addr, port, rank)
    except (RuntimeError, OSError) as e:
        print(f"rank {rank}: cannot reach rank 0 at {addr}:{port} ({e})", file=sys.stderr, flush=True)
        os._exit(1)
    try:
        config: EngineConfig = pickle.loads(store.get("config"))
        parallel = config.parallel
        ws = Workspace.load(workspace)
        if ws.config != config.model:
            raise UserError(f"{workspace} is not the model rank 0 serves ({config.workspace} there)")
        if ws.fingerprint() != store.get("fingerprint").decode():
            raise UserError(f"{workspace} has the model rank 0 serves ({config.workspace} there) but other weights, "
                            "dtype or quantization: give every node the same workspace")
        config = replace(config, workspace=str(ws.path),
                         device=rank_device(config.device, rank % parallel.local_ranks))
        store.set(f"ready/{rank}", "1")
        size = parallel.tp
        # every rank joins the group together: a node that comes late must not time the others' joining out
        wait_keys(store, ["all_ready"], lambda: rank_error(store, size), "rank 0 did not start the group")
        _init(rank, size, store, config.device, parallel.local_ranks)
        runner = ModelRunner(config, ws, TP(rank, size),
                             loaded=lambda: wait_loaded(store, rank, size, lambda: rank_error(store, size)))
        heartbeat.done.set()
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                break
            if message[0] == ("ping",):  # rank 0's health probe
                _ping(runner.device)
            elif isinstance(message[0], tuple):  # ("warm", nbytes): rank 0's engine is idle
                runner.warm_cache(message[0][1])
            else:
                runner.execute(message[0])
        dist.destroy_process_group()
    except BaseException as e:
        why = f"rank {rank}: {type(e).__name__}: {e}"
        print(f"{why}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        try:
            store.set(f"error/{rank}", why)
        finally:
            os._exit(1)  # close our sockets now: the other ranks' collectives fail instead of waiting


def start_workers(ranks, parallel: ParallelConfig, port: int, workspace: str) -> list:
    """Worker processes for ranks (fresh interpreters, so scripts need no __main__ guard)."""
    return [subprocess.Popen([sys.executable, "-m", "lmcli.engine.distributed", str(rank), parallel.master_addr,
                              str(port), workspace]) for rank in ranks]


def run_node(parallel: ParallelConfig, workspace: str) -> int:
    """A node other than rank 0's: its ranks' workers, until rank 0 ends them (0) or one fails (its exit code)."""
    k = parallel.local_ranks
    workers = start_workers(range(parallel.node_rank * k, parallel.node_rank * k + k), parallel,
                            parallel.master_port, workspace)

    def stop(*_):
        for w in workers:
            w.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [w.wait() for w in workers]
    return next((c for c in codes if c), 0)


class DistributedRunner(ModelRunner):
    """Rank 0's model runner: hosts the rendezvous, starts this machine's workers, waits for the other nodes'
    ranks, and broadcasts each step's plan to them all."""

    def __init__(self, config: EngineConfig, workspace: Workspace):
        parallel = config.parallel
        size, k = parallel.tp, parallel.local_ranks
        if parallel.node_rank != 0:
            raise UserError("rank 0's engine runs on node 0; other nodes run workers (run_node)")
        check_gpus(config.device, parallel)
        host = parallel.master_addr if parallel.nnodes > 1 else "127.0.0.1"
        try:
            self.store = dist.TCPStore(host, parallel.master_port, size, is_master=True,
                                       timeout=timedelta(seconds=join_timeout()), wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise UserError(f"cannot listen for the other ranks on {host}:{parallel.master_port}: {e}") from None
        self.store.set("fingerprint", workspace.fingerprint())
        self.store.set("config", pickle.dumps(config))  # last: workers read it first
        self.size, self.remote = size, range(k, size)  # the other nodes' ranks
        self.last_message = time.monotonic()  # of rank 0's latest broadcast (keep_alive)
        self.workers = start_workers(range(1, k), replace(parallel, master_addr="127.0.0.1"), self.store.port,
                                     config.workspace)
        silence = Silence(self.store, self.remote)
        try:
            self._wait_ready()
            self.store.set("all_ready", "1")
            config = replace(config, device=rank_device(config.device, 0))
            _init(0, size, self.store, config.device, k)
            super().__init__(config, workspace, TP(0, size), loaded=lambda: wait_loaded(
                self.store, 0, size, lambda: self._worker_error() or silence.error()))
        except Exception as e:
            error = self._worker_error() or silence.error()
            self.store.set("error/0", f"rank 0: {type(e).__name__}: {error or e}")  # the workers stop waiting
            self.shutdown()
            raise error or e

    def _wait_ready(self) -> None:
        """Until every rank has read its config: this machine's at once, the other nodes' within join_timeout()."""
        deadline = time.monotonic() + join_timeout()
        for rank in range(1, self.size):
            while not self.store.check([f"ready/{rank}"]):
                error = self._worker_error()
                if error is not None:
                    raise error
                if rank in self.remote and time.monotonic() > deadline:
                    node = rank // self.remote.start  # the ranks a node holds
                    raise WorkerError(f"node {node} did not join within {join_timeout():.0f} s: run the same "
                                      f"command there with --node-rank {node}")
                time.sleep(0.05)

    def execute(self, items: list[tuple]):
        run = super().execute
        return self._together(items, lambda: run(items))

    def warm_cache(self, nbytes: int) -> bool:
        warm = super().warm_cache
        return self._together(("warm", nbytes), lambda: warm(nbytes))  # every rank's pool has the same size

    def _together(self, message, run, wait: bool = True):
        """Broadcast message, then run rank 0's share; a failure of either raises the failed rank's error."""
        self.last_message = time.monotonic()
        try:
            dist.broadcast_object_list([message], src=0)
            return run()
        except Exception as e:
            raise self._worker_error(wait=wait) or self._lost(e)

    def check(self) -> None:
        """Raise if a rank is gone: a local worker that exited, or (other nodes) one that misses a ping."""
        error = self._worker_error()
        if error is not None:
            raise error
        if self.remote:
            self.ping()

    def keep_alive(self) -> None:
        """For idle time: a ping every quarter of timeout(), so that the workers' wait for the next step (a
        collective, under that timeout) never runs out while the server idles; raises if a rank is gone."""
        if time.monotonic() - self.last_message >= timeout().total_seconds() / 4:
            self.ping()

    def ping(self) -> None:
        # a ping answers at once: a failed worker's own word is in the store by now, if any
        self._together(("ping",), lambda: _ping(self.device), wait=False)

    def _lost(self, e: Exception) -> Exception:
        """A collective's failure with no worker's own word: on several nodes, a node that stopped."""
        if not self.remote:
            return e
        return WorkerError(f"a tensor-parallel rank on another node is gone (its lm stopped, or the network between "
                           f"the nodes failed): {type(e).__name__}: {e}")

    def _worker_error(self, wait: bool = False):
        """The first rank's error, if one failed (waiting a moment for a dying worker on this machine to be seen
        dead; a worker's own word is in the store before its sockets close)."""
        deadline = time.monotonic() + (5 if wait and self.workers else 0)
        while True:
            error = rank_error(self.store, self.size)
            if error is not None:
                return error
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None:
                    return WorkerError(f"tensor-parallel worker {rank} died (exit code {proc.returncode})")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def shutdown(self) -> None:
        if dist.is_initialized():
            try:
                if all(p.poll() is None for p in self.workers):
                    dist.broadcast_object_list([None], src=0)
            except Exception:
                pass
            dist.destroy_process_group()
        for p in self.workers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4])
