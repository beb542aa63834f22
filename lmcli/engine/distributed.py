"""Tensor parallelism: rank 0 lives in the engine's process and schedules; ranks 1..N-1 are worker processes.
Every step rank 0 broadcasts the step's plan (one broadcast of a small pickled list); then every rank runs its
shard of every layer, the row-parallel layers all-reducing. gloo on CPU, NCCL on CUDA.

A worker that fails writes its error to a file and exits at once; its closed sockets make rank 0's pending
collective fail, and rank 0 raises the worker's error instead of hanging."""

import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from lmcli.engine.config import EngineConfig, rank_device
from lmcli.engine.layers.parallel import TP
from lmcli.engine.model_runner import ModelRunner
from lmcli.errors import UserError
from lmcli.workspace import Workspace

TIMEOUT = timedelta(seconds=120)  # the backstop for a collective that never completes


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed."""


def _init(rank: int, size: int, store, device: str) -> None:
    """Join the group; device: this rank's own (rank_device)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    # each rank gets its share of the cores, so ranks do not fight over them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT)


def check_gpus(device: str, size: int) -> None:
    """A GPU a rank, from the one asked for: else a UserError now, not a worker's 'invalid device ordinal'."""
    if device == "cpu":
        return
    last, seen = rank_device(device, size - 1), torch.cuda.device_count()
    if int(last[5:]) >= seen:
        raise UserError(f"--tp {size} on {device} needs a GPU a rank ({rank_device(device, 0)} to {last}); torch sees "
                        f"{seen}")


def _rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    from dataclasses import replace

    return replace(config, device=rank_device(config.device, rank))


def worker_main(rank: int, port: int, config_file: str, error_file: str) -> None:
    """A tensor-parallel worker: joins the group, loads its shard, then runs every step rank 0 broadcasts."""
    try:
        with open(config_file, "rb") as f:
            config = pickle.load(f)
        size = config.parallel.tp
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=TIMEOUT)
        store.set(f"ready/{rank}", "1")
        config = _rank_config(config, rank)
        _init(rank, size, store, config.device)
        runner = ModelRunner(config, Workspace.load(config.workspace), TP(rank, size))
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                break
            if isinstance(message[0], tuple):  # ("warm", nbytes): rank 0's engine is idle
                runner.warm_cache(message[0][1])
            else:
                runner.execute(message[0])
        dist.destroy_process_group()
    except BaseException as e:
        with open(error_file, "w") as f:
            f.write(f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        os._exit(1)  # close our sockets now: the other ranks' collectives fail instead of waiting


class DistributedRunner(ModelRunner):
    """Rank 0's model runner: starts the workers (fresh interpreters, so scripts need no __main__ guard) and
    broadcasts each step's plan to them."""

    def __init__(self, config: EngineConfig, workspace: Workspace):
        size = config.parallel.tp
        check_gpus(config.device, size)
        self.tmp = tempfile.TemporaryDirectory(prefix="lm-tp-")
        config_file = os.path.join(self.tmp.name, "config.pickle")
        with open(config_file, "wb") as f:
            pickle.dump(config, f)
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        self.workers = [subprocess.Popen([sys.executable, "-m", "lmcli.engine.distributed", str(rank),
                                          str(store.port), config_file, self._error_file(rank)])
                        for rank in range(1, size)]
        try:
            for rank, proc in enumerate(self.workers, start=1):
                while not store.check([f"ready/{rank}"]):
                    if proc.poll() is not None:
                        raise self._worker_error() or WorkerError(f"worker {rank} exited with {proc.returncode}")
                    time.sleep(0.05)
            config = _rank_config(config, 0)
            _init(0, size, store, config.device)
            super().__init__(config, workspace, TP(0, size))
        except Exception as e:
            error = self._worker_error()
            self.shutdown()
            raise error or e

    def _error_file(self, rank: int) -> str:
        return os.path.join(self.tmp.name, f"error-{rank}.txt")

    def execute(self, items: list[tuple]):
        try:
            dist.broadcast_object_list([items], src=0)
            return super().execute(items)
        except Exception as e:
            raise self._worker_error(wait=True) or e

    def warm_cache(self, nbytes: int) -> bool:
        try:
            dist.broadcast_object_list([("warm", nbytes)], src=0)  # every rank's pool has the same size
            return super().warm_cache(nbytes)
        except Exception as e:
            raise self._worker_error(wait=True) or e

    def check(self) -> None:
        error = self._worker_error()
        if error is not None:
            raise error

    def _worker_error(self, wait: bool = False):
        """The first worker's error, if one failed (waiting a moment for a dying worker to say why)."""
        deadline = time.monotonic() + (5 if wait else 0)
        while True:
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None and os.path.exists(self._error_file(rank)):
                    with open(self._error_file(rank)) as f:
                        return WorkerError(f.readline().strip())
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
        self.tmp.cleanup()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
