"""Running jobs on a loaded pipeline: one (:func:`run_job`), a list (:func:`run_jobs`), and a whole batch with
resume and, under ``torchrun``, its jobs shared among the replicas (:func:`run_batch`).

A job that fails (a missing or unreadable image, a size the models cannot make, out of memory) becomes an error
record naming what failed; the next job runs. Only rank 0 writes ``results.jsonl``; every replica writes its own
jobs' videos (each atomically, so a killed run leaves whole videos or none).
"""

from __future__ import annotations

import dataclasses
import os
import time

from ..generation.failures import one_line
from ..generation.request import GenerationRequest
from .jobs import Job
from .results import ResultsLog, make_record, output_path, remove_temp_files

__all__ = ["BatchSummary", "Replicas", "job_request", "run_batch", "run_job", "run_jobs"]


def job_request(job: Job, out_dir) -> GenerationRequest:
    """The request that runs ``job``: its settings with its image path and ``<out_dir>/<id>.mp4`` as the output
    (the pipeline reads the image when the job starts and writes the video atomically)."""
    return job.request.replace(image=job.image, output=output_path(out_dir, job.id))


def run_jobs(pipe, jobs, out_dir, *, progress: bool = False):
    """Run ``jobs`` (a list of :class:`~swift_model.batch.jobs.Job`) on ``pipe`` (a loaded
    :class:`~swift_model.generation.pipeline.SwiftI2VPipeline`) one after another, writing ``<out_dir>/<id>.mp4``;
    yields each job's record (:func:`~swift_model.batch.results.make_record`) as it finishes. ``progress``: a bar
    over the jobs. A generator: the next job runs when its record is asked for."""
    jobs = list(jobs)
    outcomes = pipe.generate_many([job_request(job, out_dir) for job in jobs], progress=progress)
    for job in jobs:
        t0 = time.perf_counter()
        outcome = next(outcomes)
        seconds = time.perf_counter() - t0
        if isinstance(outcome, BaseException):
            yield make_record(job, "error", None, seconds, one_line(outcome))
        else:
            yield make_record(job, "ok", outcome.output, seconds)


def run_job(pipe, job: Job, out_dir) -> dict:
    """Run one job on a loaded pipeline and return its record: reads the image, generates, writes
    ``<out_dir>/<id>.mp4`` atomically. A failure of the job itself is an error record, never an exception."""
    return next(run_jobs(pipe, [job], out_dir))


@dataclasses.dataclass(frozen=True)
class Replicas:
    """How a batch's jobs are shared among processes: ``count`` replicas of ``size`` consecutive ranks each (a
    replica makes whole videos, its ``size`` ranks together with Ulysses when ``size > 1``); this process is
    ``rank`` of the ``count * size``; ``group``: the torch.distributed group of all of them (``None``: one
    process). Replica ``i`` takes jobs ``i, i + count, i + 2*count, ...`` of those still to run."""

    count: int = 1
    size: int = 1
    rank: int = 0
    group: object = None

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 1 or not 0 <= self.rank < self.count * self.size:
            raise ValueError(f"rank {self.rank} outside {self.count} replicas of {self.size} ranks")

    @property
    def index(self) -> int:
        """This process's replica."""
        return self.rank // self.size

    @property
    def is_main(self) -> bool:
        """Whether this process writes ``results.jsonl`` and shows the bar (rank 0)."""
        return self.rank == 0

    @property
    def is_lead(self) -> bool:
        """Whether this process reports its replica's records (the replica's first rank, which writes its
        videos)."""
        return self.rank % self.size == 0

    def gather(self, record):
        """Every replica's ``record`` of this round, in replica order (a collective: every rank calls it; the
        records of the ranks that are not their replica's lead are dropped)."""
        if self.count * self.size == 1:
            return [record]
        import torch.distributed as dist

        every: list = [None] * (self.count * self.size)
        dist.all_gather_object(every, record if self.is_lead else None, group=self.group)
        return every[::self.size]

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a collective)."""
        if self.count * self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@dataclasses.dataclass
class BatchSummary:
    """What a batch did: the jobs run ok, failed, and skipped (finished by an earlier run), and its seconds."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)  # the error records

    def count(self, record: dict) -> None:
        """Count a job's record (:func:`~swift_model.batch.results.make_record`): ok, or failed with its record."""
        if record["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.failures.append(record)

    def line(self, out_dir) -> str:
        """The one line ``swift-i2v batch`` prints at the end."""
        text = f"batch: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (done before)"
        return f"{text} in {self.seconds:.1f}s; records in {os.path.join(out_dir, 'results.jsonl')}"


def pending_jobs(jobs, out_dir) -> tuple[list[Job], int]:
    """The jobs a run still has to do (those not recorded ok with their video present) and how many are skipped;
    removes the temporary videos of a killed run. Call it on rank 0 alone, before any job starts."""
    remove_temp_files(out_dir)
    done = ResultsLog(out_dir).finished()
    todo = [job for job in jobs if job.id not in done]
    return todo, len(jobs) - len(todo)


def run_batch(pipe, jobs, out_dir, *, replicas: Replicas = Replicas(), progress: bool = True) -> BatchSummary:
    """Run the jobs of a batch that are not finished yet and record each in ``<out_dir>/results.jsonl``.

    Every rank calls it with the same ``jobs``, with ``pipe`` set up for its replica (the ranks of a replica run
    the same jobs together). Rank 0 decides what is left to do (:func:`pending_jobs`) and tells the others; the
    replicas then run in rounds, each one job per round, and the round's records are gathered and appended by
    rank 0, in job-file order. A killed run keeps every video already renamed into place and the records of
    every round gathered before the kill; a video whose record was lost is made again by the next run.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    todo, skipped = pending_jobs(jobs, out_dir) if replicas.is_main else (None, None)
    todo, skipped = replicas.broadcast((todo, skipped))
    mine = todo[replicas.index::replicas.count]
    rounds = -(-len(todo) // replicas.count)
    log = ResultsLog(out_dir) if replicas.is_main else None
    summary = BatchSummary(skipped=skipped)
    bar = tqdm(total=len(todo), desc="videos", unit="video", disable=not (progress and replicas.is_main),
               dynamic_ncols=True)
    records = run_jobs(pipe, mine, out_dir)
    try:
        for i in range(rounds):
            record = next(records) if i < len(mine) else None  # a replica out of jobs still joins the gather
            for rec in replicas.gather(record):
                if rec is None:
                    continue
                if log is not None:
                    log.append(rec)
                summary.count(rec)
                bar.update(1)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
