"""``parity check`` on several GPUs or machines, under ``torchrun``.

    torchrun --nproc-per-node 2 -m parity check JOB --device cuda --out REPORT
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT -m parity check JOB --out /shared/REPORT

Each rank reads its rank and world size from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
loads the base model once on its own GPU (``cuda`` means ``cuda:LOCAL_RANK``) and replays a contiguous share of
the previews (``shard``: balanced by work, so each rank swaps LoRAs as rarely as one process would). Every replay
is written to the ``--out`` replay cache as it finishes, so a rank that crashes loses nothing finished: running
the same command again replays only what is missing (with several machines, put ``--out`` on a shared
filesystem for that). The ranks talk through a gloo process group (CPU, any machine): the noise-algorithm
candidates are split between them, and rank 0 gathers every result and writes the one report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass
class Dist:
    """This process's place in the run. ``world == 1`` (no torchrun) makes every collective a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world if self.is_main else None
        td.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group once every rank is done with it (a barrier, then teardown). A rank that just
        exits while gloo's threads still run can abort at interpreter exit ("terminate called without an active
        exception", SIGABRT: seen once in CI on the non-reporting rank)."""
        if self._group:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()
            self._group = False


def current() -> Dist:
    """The run's ``Dist`` from torchrun's environment (joining the process group the first time: torch keeps it,
    so nothing is cached here)."""
    return from_env()


def from_env(environ=None) -> Dist:
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(environ["RANK"])
    local_rank = int(environ.get("LOCAL_RANK", rank))
    import torch
    import torch.distributed as td

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not td.is_initialized():
        # gloo carries only small Python objects (scores, results); replays never cross ranks. No timeout short
        # enough to fire while another rank is still replaying its share; torchrun ends the others on a crash.
        td.init_process_group("gloo", timeout=timedelta(days=7))
    return Dist(rank=rank, world=world, local_rank=local_rank, _group=True)


def shard(costs: list[float], world: int) -> list[list[int]]:
    """Split indices ``0..len(costs)-1`` into ``world`` contiguous runs of about equal total cost.

    Contiguous runs keep a checkpoint's previews together (the plan orders them by step), so each rank swaps
    LoRAs about as rarely as one process would; an index goes to the rank whose share holds its cost midpoint.
    """
    total = float(sum(costs))
    shares: list[list[int]] = [[] for _ in range(world)]
    if not costs:
        return shares
    if total <= 0:
        costs, total = [1.0] * len(costs), float(len(costs))
    running = 0.0
    for index, cost in enumerate(costs):
        middle = running + cost / 2
        shares[min(world - 1, int(middle / total * world))].append(index)
        running += cost
    return shares


def replay_cost(item) -> float:
    """Relative work of one replay: latent tokens x steps x transformer passes."""
    passes = 2 if float(item.guidance_scale or 0) > 1 else 1
    return float(item.gen_width * item.gen_height) * int(item.num_inference_steps) * passes
