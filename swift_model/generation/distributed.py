"""One generation on several processes: the ``torchrun`` environment, the process groups, CFG parallel.

``torchrun --nproc-per-node N -m swift_model.cli generate ...`` starts N copies of the command. Each reads its
rank from the environment (:func:`torchrun_env`), joins the process group (:func:`init_process_group`: NCCL on
GPUs, gloo on CPUs, always with a timeout) and builds the same :class:`Parallelism` (a collective: every rank
creates every group, in the same order). The N ranks split as ``cfg x replicas x ulysses``:

- **CFG parallel** (``cfg = 2``, only with guidance): ranks ``0 .. N/2-1`` run the conditional branch of every
  DiT call, ranks ``N/2 .. N-1`` the unconditional one; rank ``j`` and rank ``j + N/2`` then swap their
  velocities (one all-gather over the pair), so every rank holds both and the sampler combines
  ``v_u + g*(v_c - v_u)`` identically everywhere (:meth:`Parallelism.velocities`).
- **Ulysses** (``ulysses = K``): K consecutive ranks of a half split each DiT call's tokens (and the attention's
  heads) between them (:mod:`swift_model.nets.parallel`); K must divide both DiTs' head counts.
- **Replicas**: what is left of N (``N / (cfg * K)``) runs identical copies of the same work; only useful with
  FSDP, when the point is to spread the weights, not the work.
- **FSDP2** (``fsdp``): every transformer block of both DiTs is sharded over all N ranks
  (:func:`swift_model.nets.parallel.fsdp_shard_blocks`).

Every rank validates the same arguments the same way (:func:`resolve_degrees`, :func:`check_pipeline`), so bad
input raises the same ``ValueError`` on every rank before any collective; :meth:`Parallelism.agree` turns an
error on some ranks (a file one rank cannot read) into the same :class:`AgreedError` on all of them, so no
rank is left waiting in a collective. Only rank 0 shows progress bars, prints and writes files.

Nothing here has run on a GPU or on several machines; the tests run it on CPU processes with gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..nets.parallel import check_heads, fsdp_shard_blocks
from .csg import check_int
from .failures import failure_of, watch_peers

__all__ = [
    "AgreedError",
    "COLLECTIVE_TIMEOUT",
    "Parallelism",
    "check_fsdp_memory",
    "check_pipeline",
    "check_sizes",
    "check_tokens",
    "distribute",
    "env_rank",
    "init_process_group",
    "memory_plan",
    "processes",
    "resolve_device",
    "resolve_degrees",
    "torchrun_env",
    "torchrun_world_size",
]

# A rank waiting longer than this for its peers raises instead of hanging (the 14B's load is not a collective,
# but the first collective after it waits for the slowest rank's load: generous).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class AgreedError(ValueError):
    """An error every rank raises with the same message (printed once, by rank 0)."""

    agreed_by_all_ranks = True  # not one rank's failure: swift_model.generation.failures lets it pass


# -------------------------------------------------------------------------------------------------------------
# the torchrun environment
# -------------------------------------------------------------------------------------------------------------


def torchrun_env() -> dict | None:
    """``{"rank", "local_rank", "world_size"}`` from the environment ``torchrun`` sets, or ``None`` outside it.

    Raises ``ValueError`` for a malformed environment (a rank outside the world, a non-integer).
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        env = {"rank": int(os.environ["RANK"]), "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
               "world_size": int(os.environ["WORLD_SIZE"])}
    except ValueError:
        raise ValueError(f"the torchrun environment is malformed: RANK={os.environ['RANK']!r}, "
                         f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} (integers expected)") from None
    if env["world_size"] < 1 or not 0 <= env["rank"] < env["world_size"]:
        raise ValueError(f"the torchrun environment is malformed: RANK={env['rank']} with WORLD_SIZE={env['world_size']}")
    return env


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 outside torchrun or when malformed); needs no process group."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's rank: the initialised group's, else ``RANK`` from the environment, else 0. Works before
    (and without) a process group, e.g. to decide which rank prints an error."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def default_device(env: dict | None) -> torch.device:
    """``cuda:LOCAL_RANK`` under torchrun with GPUs (``cuda`` in one process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env["local_rank"] if env else torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(device: torch.device, env: dict, *, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> None:
    """Join the process group torchrun describes: NCCL for CUDA devices, gloo otherwise, with ``timeout``.

    A CUDA ``device`` becomes the current device first (NCCL's collectives run there). Does nothing when a
    group is already initialised.
    """
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)


# -------------------------------------------------------------------------------------------------------------
# degrees
# -------------------------------------------------------------------------------------------------------------


def resolve_degrees(world_size: int, *, ulysses: int | None = None, cfg_parallel: bool = False,
                    fsdp: bool = False, guidance: bool = False) -> dict:
    """The split of ``world_size`` ranks a generation uses, after checking the request.

    Args:
        world_size: processes (``torchrun --nproc-per-node``; 1 without torchrun).
        ulysses: ranks per Ulysses group (``--ulysses``); default: every rank of a CFG half (all N without CFG
            parallel).
        cfg_parallel: run the two guidance branches on two halves of the ranks (``--cfg-parallel``).
        fsdp: shard both DiTs' blocks over all ranks (``--fsdp``).
        guidance: whether guidance is on (a scale other than 1).

    Returns ``{"world_size", "ulysses", "cfg_parallel", "fsdp", "replicas"}``. Raises ``ValueError`` naming the
    flag: a pure function of its arguments, so every rank raises the same error for the same command.
    """
    world_size = check_int(world_size, "world_size", 1)
    cfg = 2 if cfg_parallel else 1
    if cfg_parallel and not guidance:
        raise ValueError("--cfg-parallel splits the two guidance branches over the ranks: it needs --guidance "
                         "(a scale other than 1)")
    if world_size == 1:
        for flag, on in (("--cfg-parallel", cfg_parallel), ("--fsdp", fsdp),
                         (f"--ulysses {ulysses}", ulysses is not None and ulysses != 1)):
            if on:
                raise ValueError(f"{flag} needs several processes: run under torchrun --nproc-per-node N")
    if world_size % cfg:
        raise ValueError(f"--cfg-parallel needs an even number of processes, got {world_size}")
    per_branch = world_size // cfg
    if ulysses is None:
        ulysses = per_branch
    ulysses = check_int(ulysses, "--ulysses", 1)
    if per_branch % ulysses:
        where = f"the {per_branch} ranks of each CFG half" if cfg_parallel else f"the {world_size} ranks"
        raise ValueError(f"--ulysses {ulysses} must divide {where} (torchrun --nproc-per-node {world_size})")
    return {"world_size": world_size, "ulysses": ulysses, "cfg_parallel": bool(cfg_parallel), "fsdp": bool(fsdp),
            "replicas": per_branch // ulysses}


def check_heads_of(models: dict[str, torch.nn.Module], ulysses: int) -> None:
    """``ValueError`` when ``ulysses`` does not divide the head count of one of ``models`` (name -> DiT)."""
    for name, model in models.items():
        heads = model.config.num_heads
        try:
            check_heads(heads, ulysses)
        except ValueError:
            raise ValueError(f"--ulysses {ulysses} must divide the attention heads of both DiTs: the {name} DiT has "
                             f"{heads} heads") from None


def check_tokens(num_tokens: int, ulysses: int, what: str) -> None:
    """``ValueError`` when a DiT call of ``num_tokens`` tokens is too short to give each of ``ulysses`` ranks a
    token (checked before any stage runs, so it fails at once, on every rank)."""
    if num_tokens < ulysses:
        raise ValueError(f"{what} has {num_tokens} tokens, fewer than the {ulysses} Ulysses ranks that split it: "
                         f"use a smaller --ulysses or a larger video")


# -------------------------------------------------------------------------------------------------------------
# the groups
# -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How this process takes part in a generation (one process: the defaults, no group at all).

    ``sp_group``: this rank's Ulysses group (``None`` when ``ulysses == 1``); ``cfg_group``: the pair
    ``{j, j + N/2}`` that swaps guidance branches (``None`` without CFG parallel); ``branch``: 0 for the
    conditional half, 1 for the unconditional one. Build it with :meth:`build` on every rank.
    """

    world_size: int = 1
    rank: int = 0
    ulysses: int = 1
    cfg_parallel: bool = False
    fsdp: bool = False
    replicas: int = 1
    sp_group: Any = None
    cfg_group: Any = None
    branch: int = 0
    whole_group: Any = None  # the group of the ranks that make one video together; None: every rank (WORLD)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0: the one that shows progress, prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes take part (and collectives are needed)."""
        return self.world_size > 1

    @property
    def group(self):
        """The group of every rank of this generation (the VAE's tiles are spread over all of them): the whole
        world, or a replica's group (:meth:`replica`); ``None`` in one process."""
        if not self.distributed:
            return None
        return dist.group.WORLD if self.whole_group is None else self.whole_group

    def replica(self) -> "Parallelism":
        """The parallelism of this rank's replica alone, for work whose replicas make different videos (``batch``):
        the ``ulysses`` consecutive ranks of its Ulysses group as a world of their own (its rank 0 writes the
        video). Without CFG parallel or FSDP, which span the replicas."""
        if self.cfg_parallel or self.fsdp:
            raise ValueError("a replica of its own runs without --cfg-degree 2 and --fsdp")
        if self.ulysses == 1:
            return Parallelism()
        return dataclasses.replace(self, world_size=self.ulysses, rank=self.rank % self.ulysses, replicas=1,
                                   whole_group=self.sp_group)

    def report(self) -> dict:
        """The degrees used, for ``--report``, named as other video generators name them: ``world_size`` =
        ``cfg_degree x data_parallel_degree x ulysses_degree`` (integers; the data-parallel ranks are the
        replicas), and whether the DiTs are sharded (``fsdp``)."""
        return {"world_size": self.world_size, "ulysses_degree": self.ulysses,
                "cfg_degree": 2 if self.cfg_parallel else 1, "data_parallel_degree": self.replicas,
                "fsdp": self.fsdp}

    @classmethod
    def build(cls, *, ulysses: int | None = None, cfg_parallel: bool = False, fsdp: bool = False,
              guidance: bool = False) -> "Parallelism":
        """The parallelism of this rank in the initialised process group (one process when there is none).

        Validates the degrees (:func:`resolve_degrees`) and creates every group; a collective: every rank calls
        it with the same arguments. The world splits as ``cfg x replicas x ulysses`` with the Ulysses ranks
        consecutive (on one node with several GPUs, the all-to-alls then stay on the fastest links).
        """
        if not (dist.is_available() and dist.is_initialized()):
            resolve_degrees(1, ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp, guidance=guidance)
            return cls()
        world, rank = dist.get_world_size(), dist.get_rank()
        deg = resolve_degrees(world, ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp, guidance=guidance)
        K = deg["ulysses"]
        sp_group = cfg_group = None
        if K > 1:
            for start in range(0, world, K):  # every rank creates every group, in the same order
                g = dist.new_group(list(range(start, start + K)))
                if start <= rank < start + K:
                    sp_group = g
        half = world // 2
        if cfg_parallel:
            for j in range(half):
                g = dist.new_group([j, j + half])
                if rank in (j, j + half):
                    cfg_group = g
        return cls(world_size=world, rank=rank, ulysses=K, cfg_parallel=bool(cfg_parallel), fsdp=bool(fsdp),
                   replicas=deg["replicas"], sp_group=sp_group, cfg_group=cfg_group,
                   branch=int(cfg_parallel and rank >= half))

    # -- guidance --------------------------------------------------------------------------------------

    def velocities(self, call: Callable[[Any], torch.Tensor], cond, uncond, guided: bool):
        """The velocities of one sampling step: ``call(cond)`` without guidance; ``(v_cond, v_uncond)`` with it.

        ``call(context)`` runs the DiT with the conditional or the unconditional context (cache) and returns an
        fp32 velocity. With CFG parallel each rank runs its half's branch only and the pair swaps the results,
        so every rank returns the same two tensors, bitwise the ones its pair computed. The guidance itself
        (``v_u + g*(v_c - v_u)``) is the sampler's, identical on every rank.
        """
        if not guided:
            return call(cond)
        if not self.cfg_parallel:
            return call(cond), call(uncond)
        mine = call(uncond if self.branch else cond).contiguous()
        both = mine.new_empty(2 * mine.numel())  # flat: the all-gather concatenates along dim 0
        _all_gather_single(both, mine.view(-1), group=self.cfg_group)  # group rank 0 is the conditional half
        v_cond, v_uncond = both.view(2, *mine.shape).unbind(0)
        return v_cond, v_uncond

    # -- errors ----------------------------------------------------------------------------------------

    def agree(self, error: BaseException | None) -> None:
        """Raise the same :class:`AgreedError` on every rank when any rank had an ``error`` (``None``: none).

        A collective: every rank calls it at the same point. The message is the lowest failing rank's, so
        every rank reports the same thing, and no rank goes on into a collective its peers will never reach.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        message = None if error is None else (" ".join(str(error).split()) or type(error).__name__)
        every: list = [None] * self.world_size
        dist.all_gather_object(every, message)
        failed = [(r, m) for r, m in enumerate(every) if m is not None]
        if failed:
            r, m = failed[0]
            # the usual case: every rank rejected the same argument; else say whose error it is
            everywhere = len(failed) == self.world_size and all(m2 == m for _, m2 in failed)
            raise AgreedError(m if everywhere else f"rank {r}: {m}") from error


# torch >= 2.14 renames all_gather_into_tensor (deprecated there) to all_gather_single; same signature
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def resolve_device(device: str | None, env: dict | None) -> torch.device:
    """The device of this rank for ``--device`` (``None``: ``cuda:LOCAL_RANK`` when there are GPUs, else the CPU).

    Under torchrun ``cuda`` means this rank's own GPU; naming one GPU (``cuda:1``) for several ranks is an
    error, since they would all share it.
    """
    if device is None:
        return default_device(env)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if device == "cuda":
        return default_device(env)
    if device.startswith("cuda:") and env is not None and env["world_size"] > 1:
        raise ValueError(f"--device {device} would put every rank on one GPU: under torchrun pass --device cuda "
                         "(each rank then uses cuda:LOCAL_RANK)")
    return torch.device(device)


@contextlib.contextmanager
def processes(device: str | None = None, *, ulysses: int | None = None, cfg_parallel: bool = False,
              fsdp: bool = False, guidance: bool = False, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT):
    """The processes of one command: ``(parallelism, device)`` for the block, then the group is left.

    Under torchrun with several ranks it joins the process group (:func:`init_process_group`) and builds the
    groups (:meth:`Parallelism.build`); in one process it checks the flags and yields the single-process
    :class:`Parallelism`. A flag that cannot work with the world size raises the same :class:`AgreedError` on
    every rank, before any group is made.
    """
    try:  # a function of the command and the world size alone: the same on every rank
        env = torchrun_env()
        dev = resolve_device(device, env)
        world = env["world_size"] if env else 1
        resolve_degrees(world, ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp, guidance=guidance)
    except (ValueError, TypeError) as exc:
        raise AgreedError(str(exc)) from None
    if world == 1:
        yield Parallelism(), dev
        return
    owner = not dist.is_initialized()  # a group made by the caller stays the caller's
    init_process_group(dev, env, timeout=timeout)
    failed = False
    try:
        with watch_peers():  # any rank's failure ends every rank (swift_model.generation.failures)
            yield Parallelism.build(ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp, guidance=guidance), dev
    except BaseException as exc:
        failed = failure_of(exc) is not None
        raise
    finally:
        if owner and not failed:  # after a rank failed, peers may be stuck in collectives: no teardown handshake
            dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------------
# the pipeline
# -------------------------------------------------------------------------------------------------------------


def check_pipeline(pipe, par: Parallelism) -> None:
    """``ValueError`` when ``pipe`` cannot run with ``par``: Ulysses must divide both DiTs' heads; FSDP needs
    the models resident on the device in every phase (the ``fast`` memory profile: each rank then holds its
    shards, not whole models; the other profiles move whole models in and out per phase)."""
    dits = {"Stage I": pipe.stage1, "Stage II": pipe.stage2}
    check_heads_of({name: dit for name, dit in dits.items() if dit is not None}, par.ulysses)  # a part: one DiT
    check_fsdp_memory(par.fsdp, pipe.memory.profile)


def check_fsdp_memory(fsdp: bool, memory: str | None) -> None:
    """``ValueError`` when ``--fsdp`` comes with a memory profile that moves whole models between phases
    (``None``: the default, which is ``fast`` with ``--fsdp``): checked before any weight is read."""
    from .memory import get_profile, resident_profiles

    if fsdp and memory is not None and not get_profile(memory).everything_resident:
        raise ValueError(f"--fsdp keeps every rank's weight shards on the GPU in every phase: use it with --memory "
                         f"{' or '.join(resident_profiles())} (the default with --fsdp), not --memory {memory}")


def memory_plan(memory: str | None, fsdp: bool = False):
    """The :class:`~swift_model.generation.memory.MemoryPlan` of ``--memory`` and ``--fsdp`` (``generate`` and
    ``plan`` alike): with ``--fsdp`` the first profile that keeps everything resident (``fast``) by default, its
    DiTs loaded into host memory, to be sharded onto the device; ``balanced`` by default without."""
    from .memory import DEFAULT_PROFILE, MemoryPlan, resident_profiles

    check_fsdp_memory(fsdp, memory)
    if fsdp:
        return MemoryPlan(memory or resident_profiles()[0], sharded_dits=True)
    return MemoryPlan(memory or DEFAULT_PROFILE)


def check_sizes(pipe, par: Parallelism, request) -> None:
    """``ValueError`` when a DiT call of ``request`` (a :class:`~swift_model.generation.request.GenerationRequest`)
    is too short for ``par.ulysses`` ranks: Stage I's whole clip, and Stage II's shortest window (the whole clip
    when ``joint``). Runs before any stage, on every rank alike. The request's size already checked by the
    pipeline."""
    if par.ulysses == 1:
        return
    from .csg import CSGPlan

    r = request
    T1, h1, w1 = pipe.vae1.latent_shape(r.frames, r.height // 4, r.width // 4)[1:]
    check_tokens(T1 * (h1 // 2) * (w1 // 2), par.ulysses, "Stage I's clip")
    T2, h2, w2 = pipe.vae2.latent_shape(r.frames, r.height, r.width)[1:]
    per_frame = (h2 // 2) * (w2 // 2)
    if r.joint:
        check_tokens(T2 * per_frame, par.ulysses, "Stage II's clip")
    else:
        plan = CSGPlan(T2, r.segment_blocks, r.neighbors, block_tokens=per_frame)
        check_tokens(min(w.num_blocks for w in plan.windows) * per_frame, par.ulysses, "Stage II's shortest window")


def distribute(pipe, par: Parallelism) -> None:
    """Make ``pipe`` (a :class:`~swift_model.generation.pipeline.SwiftI2VPipeline`) run with ``par`` on this rank.

    Checks it (:func:`check_pipeline`), shards both DiTs' blocks over every rank with FSDP2 when ``par.fsdp``
    (a collective), and hands ``par`` to the pipeline, whose ``generate`` then splits every DiT call, runs
    the guidance branches on their halves and lets rank 0 alone write.
    """
    check_pipeline(pipe, par)
    if par.fsdp:
        for dit in pipe.dits().values():  # weights still in host memory: only the shards reach the device
            fsdp_shard_blocks(dit, dist.group.WORLD, device=pipe.device, prefetch=True)
    pipe.parallel = par
