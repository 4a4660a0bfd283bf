"""The settings of a Stage II training run (:class:`TrainConfig`): defaults, a TOML file, command-line flags.

Every field can be set in the TOML file given to ``swift-i2v train --config`` (top-level keys, the field
names below) and overridden on the command line as ``--field-name VALUE`` (``--ema`` / ``--no-ema`` for the
switches): defaults < TOML < flags. A value of the wrong type names the field and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

from ..generation.csg import parse_neighbors
from .packing import TIMESTEP_SAMPLINGS

LR_SCHEDULES = ("constant", "cosine")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")

# Fields a resumed run may change: how it runs, not what it computes (model, data order, optimiser, windows)
EXECUTION_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "compile", "attention_backend",
                    "eval_data", "eval_every", "activation_checkpointing")


@dataclass
class TrainConfig:
    """A Stage II training run (see ``swift-i2v train --help`` for each field).

    Model: ``tiny`` (the tiny random-weight Stage II) or ``init`` (a Stage II checkpoint: a public Wan2.2-TI2V-5B
    class folder is widened, its extra input channels for ``z_ref`` starting at zero; a widened one is
    continued). Steps and optimiser: AdamW, ``lr`` with a linear warm-up and a constant or cosine schedule,
    gradient clipping by global norm (0: off), ``grad_accum`` micro-batches of ``batch_size`` clips per
    data-parallel rank and step. Windows: segments of ``segment_blocks`` latent frames with ``neighbors``
    ("NL,NR") clean neighbours, ``windows_per_clip`` of them packed per clip (0: all), each with its own copy
    of the anchor (``shared_anchor``: one anchor that attends only itself, a departure from the paper).
    Timesteps: one noise level per window, ``sigmoid(N(logit_mean, logit_std))`` or uniform, shifted by
    ``timestep_shift``. Execution: ``compute_dtype`` ("auto": bf16 on a GPU with fp32 master weights and fp32
    gradient reduction, fp32 on a CPU), FSDP2 per block, Ulysses degree, activation checkpointing,
    ``offload_optimizer`` (one process: fp32 master weights, gradient sums and AdamW state in host memory, the
    step on the host, the network on the device in the compute dtype: :mod:`swift_model.training.offload`),
    ``torch.compile`` of the blocks. Bookkeeping: log, checkpoint and held-out evaluation intervals.
    """

    tiny: bool = False
    init: str = ""
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    segment_blocks: int = 2
    neighbors: str = "1,0"
    windows_per_clip: int = 0
    shared_anchor: bool = False
    timestep_sampling: str = "logit_normal"
    timestep_shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ema: bool = False
    ema_decay: float = 0.999
    compute_dtype: str = "auto"
    fsdp: bool = True
    ulysses: int = 1
    activation_checkpointing: bool = True
    offload_optimizer: bool = False
    compile: bool = False
    attention_backend: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_data: str = ""
    eval_every: int = 0

    def check(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first field whose value cannot work; returns ``self``."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type, "config")
        positive = ("batch_size", "grad_accum", "segment_blocks", "ulysses", "log_every", "checkpoint_every",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "decay_steps", "windows_per_clip", "seed", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name!r} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"config field 'lr' must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "adam_eps", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be in [0, 1), got {getattr(self, name)}")
        if not self.timestep_shift > 0 or not self.logit_std > 0:
            raise ValueError("config fields 'timestep_shift' and 'logit_std' must be > 0")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("timestep_sampling", TIMESTEP_SAMPLINGS),
                              ("compute_dtype", COMPUTE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name!r} must be one of {allowed}, got {getattr(self, name)!r}")
        try:
            parse_neighbors(self.neighbors)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config field 'neighbors': {exc}") from None
        if self.tiny and self.init:
            raise ValueError("use --tiny or --init, not both")
        if not self.tiny and not self.init:
            raise ValueError("train needs --init (a Stage II checkpoint to widen or continue) or --tiny")
        if self.offload_optimizer and self.ulysses > 1:
            raise ValueError("config field 'offload_optimizer' runs in one process; it cannot be combined with "
                             f"ulysses={self.ulysses}")
        if self.eval_every and not self.eval_data:
            raise ValueError("config field 'eval_every' needs 'eval_data' (a prepared data folder of held-out clips)")
        return self

    @property
    def neighbor_pair(self) -> tuple[int, int]:
        """``neighbors`` as ``(NL, NR)``."""
        return parse_neighbors(self.neighbors)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
        constant, or cosine down to ``min_lr_ratio * lr`` at ``decay_steps`` (0: at ``steps``)."""
        import math

        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        horizon = max(1, (self.decay_steps or self.steps) - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / horizon)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def field_type(name: str):
    """The Python type (int, float, bool or str) of field ``name``."""
    for f in fields(TrainConfig):
        if f.name == name:
            return _TYPES[f.type] if isinstance(f.type, str) else f.type
    raise KeyError(name)


def _check_type(name: str, value, tp, where: str):
    tp = _TYPES[tp] if isinstance(tp, str) else tp
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, str))
    if not ok:
        raise ValueError(f"{where} field {name!r} must be {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def read_toml(path) -> dict:
    """The fields of a TOML config file, checked by name and type (``ValueError`` naming the file and field)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ValueError("reading a TOML config needs Python 3.11 (tomllib) or the tomli package") from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    names = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ValueError(f"config file {path}: unknown field {key!r}")
        if name == "neighbors" and isinstance(value, list):  # neighbors = [1, 0] reads as "1,0"
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"config file {path}: field 'neighbors' must be two integers, got {value!r}")
            value = f"{value[0]},{value[1]}"
        out[name] = _check_type(name, value, field_type(name), f"config file {path}:")
    return out


def make_config(toml_path=None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the TOML file's fields, then ``overrides`` (e.g. command-line flags; ``None`` values
    are ignored); checked."""
    values = read_toml(toml_path) if toml_path else {}
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _check_type(name, value, field_type(name), "command-line")
    return TrainConfig(**values).check()
