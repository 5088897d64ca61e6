"""Running an experiment over several processes with torch.distributed (launched by torchrun).

    torchrun --nproc-per-node 4 -m p2p run EXP.toml --out-dir DIR               # one node, 4 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m p2p run ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `Ranks.from_env` joins the
rendezvous through torch's public `torch.distributed.rendezvous("env://")`, which gives the key-value store
every process shares (torchrun's own TCPStore), and starts a gloo process group on it (the collectives
here are a barrier and one small broadcast: CPU-side, on any device). Each process runs on its own
device: cuda:LOCAL_RANK where CUDA is available, else the CPU.

Work is handed out dynamically: every process asks the store for the next unit of work with an atomic
`add` on one counter, so a slow process takes fewer units and never holds the others back. With a single
process (no torchrun) nothing distributed is started and the counter is a local one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch

TIMEOUT = timedelta(hours=24)  # a barrier waits for the slowest rank's last unit of work


@dataclass
class Ranks:
    """This process's place among the processes of a run, and the shared counter of units of work."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    store: object | None = None  # torch.distributed.Store shared by the ranks (None for one process)
    _next: int = field(default=0, repr=False)

    @classmethod
    def from_env(cls) -> Ranks:
        """One process unless torchrun (or SLURM + torchrun) set WORLD_SIZE > 1; then join the group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        store, rank, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
        dist.init_process_group("gloo", store=dist.PrefixStore("p2p-pg", store), rank=rank, world_size=world,
                                timeout=TIMEOUT)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives restarted workers
        counter = dist.PrefixStore(f"p2p-run/{restart}", store)
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")), counter)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, asked: str | None = None) -> str | None:
        """cuda:LOCAL_RANK under torchrun where CUDA is available, else the device asked for (None: default)."""
        if self.world > 1:
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
            return "cpu"
        return asked

    def next_unit(self, key: str) -> int:
        """The index of the next unit of work of `key` no process has taken (0, 1, 2, ... over all ranks)."""
        if self.store is None:
            self._next += 1
            return self._next - 1
        return int(self.store.add(key, 1)) - 1

    def share(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
