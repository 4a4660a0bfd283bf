"""A batch across machines: the jobs as a streaming Ray Data pipeline with one actor pool per stage.

``swift-i2v batch ... --ray [ADDRESS]`` runs the jobs of a job file (:mod:`.jobs`) as two pools of Ray actors:

- **Stage I actors** (:class:`Stage1Worker`) hold the Stage I DiT, the text and CLIP encoders and the VAEs (a
  :class:`~swift_model.generation.pipeline.SwiftI2VPipeline` built with ``parts=("stage1",)``) and run the phases
  ``text_encoding`` and ``stage1``;
- **Stage II actors** (:class:`Stage2Worker`) hold the Stage II DiT and the VAEs (``parts=("stage2",)``), run
  ``bridge``, ``stage2`` and ``decode`` and write ``<out_dir>/<id>.mp4`` atomically.

What flows from one pool to the other is the Stage I result (:func:`pack_handoff`: the Stage I latents and the
prompt embeddings Stage II reads; about 13 MiB per video at 2560x1408x81), so no actor ever holds both DiTs. The
actors call the pipeline's own phase methods (``prepare``, ``run_phase``), so a video is the one ``generate``
and the plain batch make for the same job (the same frames for the same seed).

The driver (:func:`run_ray_batch`) is the plain batch's bookkeeping: jobs recorded ok with their video present
are skipped, each record is appended to ``results.jsonl`` (:class:`~swift_model.batch.results.ResultsLog`) as
it streams back, a job that fails (unreadable image, a size the models cannot make) is an error record and the
batch goes on. An actor whose process dies is restarted by Ray and its unfinished jobs run again: the video is
renamed into place whole (a rerun of a job replaces it with the same file) and the record is written by the
driver alone when the job's row comes back, so a crash leaves neither a second video nor a second record.

An actor over several devices (``gpus_per_actor`` K > 1, or ``processes_per_actor`` K on the CPU) is rank 0 of
a process group of K processes on its node (:class:`~swift_model.batch.actor_group.ActorGroup`) that run each
of its jobs together, every DiT call split over the K ranks with Ulysses (our ``torchrun`` path).

Every machine of the cluster needs this package (and the checkpoints at the same paths); the images, the job
file's folder and ``out_dir`` must be on storage every machine sees at the same path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import time

import torch

from ..generation.failures import one_line
from ..generation.pipeline import Conditioning, GenerationState, SwiftI2VPipeline
from .actor_group import ActorGroup
from .results import ResultsLog, make_record, remove_temp_files
from .runner import BatchSummary, job_request, pending_jobs

__all__ = ["ModelSource", "RayOptions", "Stage1Worker", "Stage2Worker", "pack_handoff", "run_ray_batch",
           "unpack_handoff"]

STAGE1_PHASES = ("text_encoding", "stage1")
STAGE2_PHASES = ("bridge", "stage2", "decode")
INSTALL_HINT = 'Ray is not installed: pip install "ray[data]>=2.40" (the [ray] extra of this package)'


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where every actor gets its part of the models: the keyword arguments of
    :meth:`SwiftI2VPipeline.tiny <swift_model.generation.pipeline.SwiftI2VPipeline.tiny>` (``tiny=True``: the
    tiny random-weight models) or of :meth:`~swift_model.generation.pipeline.SwiftI2VPipeline.from_pretrained`
    (``stage1``, ``stage2``, ``stage1_lora``, ``memory``, ...), less ``device`` and ``parts``, which each actor
    sets. Sent to every actor (picklable), so checkpoint paths must be the same on every machine."""

    kwargs: dict = dataclasses.field(default_factory=dict)
    tiny: bool = False

    def check(self) -> None:
        """``ValueError`` for what can be checked without reading a weight (every header of the checkpoints), so
        a bad folder stops the batch before any actor starts."""
        if self.tiny:
            return
        kw = self.kwargs
        if not kw.get("stage1") or not kw.get("stage2"):
            raise ValueError("batch needs --stage1 and --stage2 checkpoint folders (or --tiny)")
        for name in ("stage1", "stage2"):
            if not os.path.exists(kw[name]):
                raise ValueError(f"{name} checkpoint not found: {kw[name]}")
        from ..loading.preflight import check_checkpoints

        check_checkpoints(kw["stage1"], kw["stage2"], stage1_lora=kw.get("stage1_lora"),
                          text_encoder=kw.get("text_encoder"), need_text_encoder=kw.get("load_text_encoder", True),
                          stage1_lora_2=kw.get("stage1_lora_2"))

    def load(self, parts, device) -> SwiftI2VPipeline:
        """The pipeline of ``parts`` (``("stage1",)`` or ``("stage2",)``) on ``device``."""
        build = SwiftI2VPipeline.tiny if self.tiny else SwiftI2VPipeline.from_pretrained
        return build(**self.kwargs, device=device, parts=parts)

    def check_processes(self, processes: int) -> None:
        """``ValueError`` when ``processes`` ranks cannot split these models' DiT calls with Ulysses (they must
        divide the attention heads of both DiTs), from the configs alone, before any actor starts."""
        if processes == 1:
            return
        from ..nets.spec import ModelSpec

        kw = self.kwargs
        if self.tiny:
            spec = ModelSpec.tiny(kw.get("stage2_kind", "swift"))
        else:
            from ..loading.preflight import checkpoint_spec

            spec = checkpoint_spec(kw["stage1"], kw["stage2"], stage2_kind=kw.get("stage2_kind", "refine"),
                                   text_encoder=kw.get("text_encoder"),
                                   load_text_encoder=kw.get("load_text_encoder", True))
        for name, cfg in (("Stage I", spec.stage1), ("Stage II", spec.stage2)):
            if cfg.num_heads % processes:
                raise ValueError(f"{processes} processes per actor split each DiT call's attention heads, and the "
                                 f"{name} DiT has {cfg.num_heads} heads: use a number of processes (GPUs) per "
                                 "actor that divides the heads of both DiTs")


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How the Ray pipeline runs.

    Attributes:
        address: the cluster to join (``ray.init(address=...)``); ``None``: ``RAY_ADDRESS`` when set, else a
            local cluster started (and stopped) for this batch.
        stage1_actors, stage2_actors: the size of each actor pool (each actor holds one DiT).
        gpus_per_actor: GPUs each actor reserves: ``None`` is 1 on a cluster with GPUs (K with
            ``processes_per_actor`` K) and 0 (the CPU) without; a fraction packs several actors on one GPU; an
            integer K > 1 makes the actor a group of K processes on its node, one per GPU, that run each job
            together (:class:`~swift_model.batch.actor_group.ActorGroup`).
        processes_per_actor: the processes of each actor's group: ``None`` is K for ``gpus_per_actor`` K > 1,
            else 1; K > 1 on the CPU (``gpus_per_actor`` 0 or a cluster without GPUs) is K gloo processes.
        cpus_per_actor: CPUs each process of an actor reserves (on the CPU it computes with that many threads).

    An actor whose process dies is restarted and its unfinished jobs run again by Ray Data's own actor fault
    tolerance (its defaults: ``max_restarts=-1``, ``max_task_retries=-1``; passing other values goes through
    the ``ray_remote_args`` Ray deprecates), so a job that kills its actor every time (a crash of the process,
    not an exception) keeps the batch from finishing: stop it, remove the job, rerun (the rest resumes).
    """

    address: str | None = None
    stage1_actors: int = 1
    stage2_actors: int = 1
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    processes_per_actor: int | None = None

    def __post_init__(self) -> None:
        for name in ("stage1_actors", "stage2_actors"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        g = self.gpus_per_actor
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
                raise ValueError(f"gpus_per_actor must be a number >= 0, got {g!r}")
            if g > 1 and g != int(g):
                raise ValueError(f"--gpus-per-actor {g:g}: an actor over several GPUs runs one process per GPU, so "
                                 "above 1 it takes a whole number")
        k = self.processes_per_actor
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"processes_per_actor must be an int >= 1, got {k!r}")
            if g is not None and 0 < g and k != max(1, g):
                raise ValueError(f"--processes-per-actor {k} with --gpus-per-actor {g:g}: an actor on GPUs runs one "
                                 "process per GPU (leave --processes-per-actor out, or use --gpus-per-actor 0 for "
                                 "processes on the CPU)")
        c = self.cpus_per_actor
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"cpus_per_actor must be a number > 0, got {c!r}")

    @property
    def processes(self) -> int:
        """The processes of each actor: ``processes_per_actor``, else one per GPU of ``gpus_per_actor`` above 1,
        else 1 (what the cluster has does not change it: without GPUs the K processes run on the CPU)."""
        g = self.gpus_per_actor
        return self.processes_per_actor or (int(g) if g is not None and g > 1 else 1)


# -- what flows between the pools ---------------------------------------------------------------------------


def pack_handoff(state: GenerationState) -> bytes:
    """The Stage I result of ``state`` as bytes: the Stage I latents and the prompt embeddings (and the negative
    prompt's when guided), the inputs the Stage II phases read; the CLIP tokens stay behind (Stage I alone
    reads them). fp32 as computed, so Stage II gets exactly what it gets in one process."""
    cond = state.conditioning
    if cond is None or state.stage1_latents is None:
        raise ValueError("the Stage I result needs the conditioning and the Stage I latents (run text_encoding "
                         "and stage1 first)")
    data = dict(stage1_latents=state.stage1_latents.cpu(), context=cond.context.cpu())
    if cond.negative_context is not None:
        data["negative_context"] = cond.negative_context.cpu()
    buf = io.BytesIO()
    torch.save(data, buf)
    return buf.getvalue()


def unpack_handoff(blob: bytes) -> GenerationState:
    """The :class:`~swift_model.generation.pipeline.GenerationState` Stage II starts from (:func:`pack_handoff`'s
    bytes)."""
    data = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    cond = Conditioning(data["context"], data.get("negative_context"))
    return GenerationState(conditioning=cond, stage1_latents=data["stage1_latents"])


# -- the actors ---------------------------------------------------------------------------------------------


class _Worker:
    """What both actors share: their part of the pipeline, built once on the actor's device, or on each of the
    ``processes`` ranks of its group (:class:`~swift_model.batch.actor_group.ActorGroup`; ``pid_dir``: see
    there)."""

    parts: tuple[str, ...] = ()

    def __init__(self, source: ModelSource, device: str, threads: int, out_dir: str, processes: int = 1,
                 pid_dir: str | None = None) -> None:
        self.out_dir = out_dir  # the job's request names its video there (job_request), as the plain batch's
        if device == "cpu":
            # the actor's CPUs, whatever the node has (and the same computation as a one-thread process)
            torch.set_num_threads(max(1, threads))
        self.group = None
        if processes > 1:
            self.group = ActorGroup(source, self.parts, processes, device, threads, pid_dir=pid_dir)
            self.pipe = self.group.pipe
        else:
            self.pipe = source.load(self.parts, device)

    def run_phases(self, job, phases, state: GenerationState):
        """Run ``phases`` of ``job`` from ``state`` (in this process, or on every rank of the group); the
        prepared run."""
        request = job_request(job, self.out_dir)
        if self.group is not None:
            return self.group.run(request, phases, state)
        with torch.no_grad():
            run = self.pipe.prepare(request)
            for phase in phases:
                self.pipe.run_phase(phase, run, state)
        return run

    def failed(self, job, exc: BaseException, seconds: float) -> str:
        """The JSON error record of ``job`` for ``exc`` when it is a failure of the job itself (the errors
        ``generate_many`` records: a bad image, a size the models cannot make, out of memory); anything else
        (a bug, a broken actor) is re-raised and stops the batch."""
        if not isinstance(exc, SwiftI2VPipeline.REQUEST_ERRORS):
            raise exc
        if self.pipe.device.type == "cuda":  # an out-of-memory job leaves cached blocks behind
            torch.cuda.empty_cache()
        return json.dumps(make_record(job, "error", None, seconds, one_line(exc)))


class Stage1Worker(_Worker):
    """A Stage I actor: a row ``{"id", "job"}`` in, the row with ``"handoff"`` (the packed Stage I result),
    ``"record"`` (``""``, or the JSON of the job's error record) and ``"seconds"`` out."""

    parts = ("stage1",)

    def __call__(self, row: dict) -> dict:
        job = pickle.loads(row["job"])
        t0 = time.perf_counter()
        handoff, record = b"", ""
        try:
            state = GenerationState()
            self.run_phases(job, STAGE1_PHASES, state)
            handoff = pack_handoff(state)
        except Exception as exc:  # noqa: BLE001 - failed() keeps a job's own failure, re-raises the rest
            record = self.failed(job, exc, time.perf_counter() - t0)
        return dict(id=row["id"], job=row["job"], handoff=handoff, record=record,
                    seconds=time.perf_counter() - t0)


class Stage2Worker(_Worker):
    """A Stage II actor: a Stage I row in, ``{"id", "record"}`` out (the job's record as JSON), the video written
    to ``<out_dir>/<id>.mp4`` atomically. A row Stage I already recorded as an error passes through.

    ``crash_once``: fault injection for the tests: when this file exists, the actor removes it and its process
    exits at once after writing a video, before the row goes back (what a killed machine does)."""

    parts = ("stage2",)

    def __init__(self, source: ModelSource, device: str, threads: int, out_dir: str, processes: int = 1,
                 pid_dir: str | None = None, crash_once: str | None = None) -> None:
        super().__init__(source, device, threads, out_dir, processes, pid_dir)
        self.crash_once = crash_once

    def __call__(self, row: dict) -> dict:
        if row["record"]:
            return dict(id=row["id"], record=row["record"])
        job = pickle.loads(row["job"])
        t0 = time.perf_counter()
        try:
            # decode writes the mp4 (rank 0 of a group): a temporary file renamed when complete
            run = self.run_phases(job, STAGE2_PHASES, unpack_handoff(row["handoff"]))
            record = json.dumps(make_record(job, "ok", run.output, row["seconds"] + time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001 - failed() keeps a job's own failure, re-raises the rest
            record = self.failed(job, exc, row["seconds"] + time.perf_counter() - t0)
        self._maybe_crash()
        return dict(id=row["id"], record=record)

    def _maybe_crash(self) -> None:
        if self.crash_once is None:
            return
        try:
            os.remove(self.crash_once)
        except FileNotFoundError:
            return
        os._exit(17)  # the process dies: no exception, no clean-up, as a killed machine


# -- the driver ---------------------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join (or start) the cluster unless this process is connected already; whether it connected here (and
    so disconnects when done)."""
    if ray.is_initialized():
        return False
    # address None: ray.init reads RAY_ADDRESS, and starts a local cluster when it is not set
    ray.init(address=address or None, include_dashboard=False, logging_level="WARNING")
    return True


def build_dataset(ray, jobs, out_dir: str, source: ModelSource, options: RayOptions, *,
                  crash_once: str | None = None, pid_dir: str | None = None):
    """The Ray Data pipeline of ``jobs``: one block per job (records stream back job by job, and a retried task
    reruns one job), then the Stage I pool, then the Stage II pool."""
    from ray.data import ActorPoolStrategy

    gpus, have, k = options.gpus_per_actor, ray.cluster_resources().get("GPU", 0), options.processes_per_actor
    if gpus is None:
        gpus = (k or 1) if have > 0 else 0
    elif gpus > 0 and have == 0:  # no actor could ever start: say so instead of waiting
        raise ValueError(f"--gpus-per-actor {gpus:g}: the Ray cluster has no GPU (--gpus-per-actor 0 computes on "
                         "the CPU)")
    processes = options.processes
    device = "cuda" if gpus > 0 else "cpu"
    threads = int(options.cpus_per_actor)
    # A dead actor is restarted and its jobs rerun by Ray Data's defaults for actor pools (RayOptions). The CPUs
    # of an actor's group are reserved for every one of its processes.
    remote = dict(num_cpus=options.cpus_per_actor * processes, num_gpus=gpus)
    # the driver's bar over videos says what Ray Data's per-operator bars would
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"id": job.id, "job": pickle.dumps(job)} for job in jobs]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(Stage1Worker, fn_constructor_args=(source, device, threads, out_dir, processes, pid_dir),
                compute=ActorPoolStrategy(size=options.stage1_actors), **remote)
    return ds.map(Stage2Worker,
                  fn_constructor_args=(source, device, threads, out_dir, processes, pid_dir, crash_once),
                  compute=ActorPoolStrategy(size=options.stage2_actors), **remote)


def run_ray_batch(jobs, out_dir, source: ModelSource, options: RayOptions | None = None, *,
                  progress: bool = True, crash_once: str | None = None, pid_dir: str | None = None) -> BatchSummary:
    """Run ``jobs`` (:class:`~swift_model.batch.jobs.Job` s) on a Ray cluster and record each in
    ``<out_dir>/results.jsonl`` as it comes back (in the order the jobs finish); returns the
    :class:`~swift_model.batch.runner.BatchSummary`. Jobs recorded ok with their video in ``out_dir`` are
    skipped, as by the plain batch. ``ValueError`` when Ray is missing, the models cannot be found or
    their heads cannot be split over the processes of an actor;
    ``RuntimeError`` when the pipeline itself fails (an actor that cannot start, an error that is not the
    job's own): the jobs recorded so far stay recorded, a rerun resumes.
    ``crash_once``: see :class:`Stage2Worker`; ``pid_dir``: see :class:`~swift_model.batch.actor_group.ActorGroup`."""
    t0 = time.perf_counter()
    options = options or RayOptions()
    source.check()
    source.check_processes(options.processes)  # before any cluster: the heads are in the configs
    ray = _import_ray()
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    todo, skipped = pending_jobs(jobs, out_dir)
    summary = BatchSummary(skipped=skipped)
    if todo:
        connected = _connect(ray, options.address)
        try:
            ds = build_dataset(ray, todo, out_dir, source, options, crash_once=crash_once, pid_dir=pid_dir)
            _stream(ray, ds, out_dir, summary, len(todo), progress)
        finally:
            if connected:
                ray.shutdown()
        remove_temp_files(out_dir)  # what an actor was writing when it died (every actor is done now)
    summary.seconds = time.perf_counter() - t0
    return summary


def _stream(ray, ds, out_dir: str, summary: BatchSummary, total: int, progress: bool) -> None:
    """Record each job of ``ds`` as its row comes back (the driver alone writes ``results.jsonl``)."""
    from tqdm.auto import tqdm

    log = ResultsLog(out_dir)
    with tqdm(total=total, disable=not progress, desc="videos", unit="video", dynamic_ncols=True) as bar:
        try:
            for row in ds.iter_rows():
                record = json.loads(row["record"])
                log.append(record)
                summary.count(record)
                bar.update(1)
        except ray.exceptions.RayError as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise RuntimeError(f"the Ray pipeline failed ({summary.ok + summary.failed} of {total} jobs recorded; "
                               f"rerun to resume): {lines[-1] if lines else type(exc).__name__}") from None
