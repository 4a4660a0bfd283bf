"""The memory plan of a generation (stages layer): which weights live on the device in each phase.

``generate`` runs as five phases (:data:`PHASES`): ``text_encoding`` (UMT5 and, for Wan2.1 I2V, CLIP),
``stage1`` (the Stage I DiT, or a two-expert Stage I's experts ``stage1`` and ``stage1_2`` taking turns on
the device: :data:`TURNS`; the Stage I VAE encodes the conditioning image), ``bridge`` (Stage I VAE decode,
Stage II VAE encode), ``stage2`` (the Stage II DiT, segment by segment) and ``decode`` (the Stage II VAE).
A :class:`MemoryPlan` says, per phase and component (:data:`COMPONENTS`), where the component's weights are:

- ``"device"``: resident on the device;
- ``"cpu"``: on the CPU (and, when the phase uses the component, it runs there: the text encoder of ``24gb``);
- ``"stream"``: a DiT whose small non-block parameters are on the device and whose transformer blocks stream
  from (pinned) CPU memory, block by block (:class:`~swift_model.generation.residency.BlockStreamer`).

Profiles (:data:`PROFILES`):

- ``fast``: everything resident for the whole run (80 GB cards; repeated runs);
- ``balanced`` (the default): one DiT on the device at a time, each encoder and VAE only in the phases that
  use it; whatever a phase does not use is evicted before the phase starts;
- ``24gb``: as ``balanced``, but both DiTs stream their blocks, and host memory is kept small (a 24 GB card
  usually sits in a 32 GB machine): the Stage I DiT's blocks are read from its weight files on each use
  (:attr:`MemoryProfile.blocks_from_files`: never whole in host memory), and the encoders are read from their
  files onto the device for the phase that runs them and dropped after it (:attr:`MemoryProfile.read_on_use`).

Each profile also sets the DiTs' inference chunk (:attr:`MemoryProfile.token_chunk`): long sequences (Stage I's whole clip)
run each block's per-token work in chunks of that many tokens, so the working set does not grow with the clip
by the FFN's width.

:class:`~swift_model.generation.residency.Residency` applies a plan to the pipeline's modules phase by phase.
"""

from __future__ import annotations

import dataclasses

PHASES = ("text_encoding", "stage1", "bridge", "stage2", "decode")
COMPONENTS = ("text_encoder", "image_encoder", "stage1", "stage2", "vae1", "vae2", "stage1_2")
PLACEMENTS = ("device", "cpu", "stream")

# The components each phase runs.
USES: dict[str, tuple[str, ...]] = {
    "text_encoding": ("text_encoder", "image_encoder"),
    "stage1": ("stage1", "stage1_2", "vae1"),
    "bridge": ("vae1", "vae2"),
    "stage2": ("stage2",),
    "decode": ("vae2",),
}

# The DiTs: the components that can stream their blocks. "stage1_2" is the low-noise expert of a two-expert
# Stage I (Wan2.2-I2V-A14B; "stage1" is then its high-noise expert); absent otherwise.
DITS = ("stage1", "stage2", "stage1_2")

# Components of one phase that take turns on the device: under every profile that does not keep everything
# resident, only the one running is there (or streams), and each switch is a copy counted in the phase's
# h2d_bytes (Residency.switch). Under `fast` all of them stay resident.
TURNS: tuple[tuple[str, ...], ...] = (("stage1", "stage1_2"),)



@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """What a memory profile keeps where: the data behind :class:`MemoryPlan`'s placements.

    Attributes:
        name: the profile's name (``--memory NAME``).
        summary: one line for ``--help``.
        everything_resident: every component on the device for the whole run (nothing moves between phases).
        stream_dits: the DiTs' transformer blocks stream from host memory block by block in the phases that
            run them (the small non-block parameters are resident).
        text_encoder_on_cpu: the text encoder stays on (and runs on) the CPU.
        token_chunk: a DiT's inference on a sequence longer than this many tokens runs each block's per-token
            work (projections, FFN, cross-attention) in chunks of that size (``WanDiT.inference_chunk_tokens``),
            so the working set grows with the clip by a few stream-sized tensors per token instead of by the
            FFN's width. Stage I holds the whole clip (18480 tokens at 640x352x81, 53680 at 241 frames); Stage II
            windows at 2560x1408 hold 14080. The smaller the chunk, the smaller the FFN's transient ([chunk,
            ffn_dim] twice) and the smaller the matmuls: 4096 rows still keep a GPU's matmul units busy on
            5120-wide weights.
        blocks_from_files: the streamed DiTs whose blocks are read from their weight files' mapped pages on each
            use instead of being held in host memory (when loaded from files:
            :meth:`SwiftI2VPipeline.from_pretrained <swift_model.generation.pipeline.SwiftI2VPipeline.from_pretrained>`
            loads them with ``blocks_from_files``). Stage I only: it runs a few passes per video (its steps, twice
            with guidance), while Stage II runs one per CSG window and step (about 40 at 2560x1408x81), which from
            files would be bound by the disk or the host's copies; its packed blocks stay in host memory.
        read_on_use: the components read from their files when a phase uses them and dropped after it (neither
            in host nor device memory in between; when loaded from files with ``deferred`` weights): the
            encoders, which run once per video.
        device_goal_gib: the device peak (GiB, as ``swift-i2v plan`` estimates it) the profile plans for; the VAE
            passes size their tiles to fit under it beside what the phase keeps resident
            (:mod:`swift_model.generation.vae_budget`). ``None``: the VAEs' fixed tiles.
    """

    name: str
    summary: str
    everything_resident: bool
    stream_dits: bool
    text_encoder_on_cpu: bool
    token_chunk: int
    device_goal_gib: float | None = None
    blocks_from_files: tuple[str, ...] = ()
    read_on_use: tuple[str, ...] = ()


def _profiles(*profiles: MemoryProfile) -> dict[str, MemoryProfile]:
    return {p.name: p for p in profiles}


# The profiles, by name (the CLI's --memory choices, in this order).
PROFILES: dict[str, MemoryProfile] = _profiles(
    MemoryProfile("fast", "everything on the GPU for the whole run (80 GB cards: about 67 GiB of GPU memory and "
                  "12 GiB of RAM at 2560x1408 with the presets, estimated; repeated runs; the default with --fsdp, "
                  "where each rank holds its weight shards)", everything_resident=True,
                  stream_dits=False, text_encoder_on_cpu=False, token_chunk=32768,
                  device_goal_gib=72.0),  # an 80 GB card, less the CUDA context and library workspaces
    MemoryProfile("balanced", "one DiT on the GPU at a time, each encoder and VAE only while it runs, every model "
                  "in RAM (about 34 GiB of GPU memory and 57 GiB of RAM with the presets, estimated; the default)",
                  everything_resident=False, stream_dits=False, text_encoder_on_cpu=False, token_chunk=16384,
                  device_goal_gib=60.0),
    # UMT5-XXL (10.6 GiB in bf16) and the Stage II DiT (9.3 GiB) cannot both stay in a 32 GB machine's memory
    # beside the rest: the encoders are read from their files for the phase that runs them, on the GPU
    MemoryProfile("24gb", "as balanced, with the DiT blocks streamed to the GPU block by block (Stage I's read "
                  "from its weight files on each use) and the encoders read from their files for their phase: "
                  "24 GB cards in 32 GB machines (about 20 GiB of GPU memory and 16 GiB of RAM with the presets, "
                  "estimated)", everything_resident=False, stream_dits=True,
                  text_encoder_on_cpu=False, token_chunk=4096, device_goal_gib=22.0,
                  blocks_from_files=("stage1", "stage1_2"), read_on_use=("text_encoder", "image_encoder")),
)
DEFAULT_PROFILE = "balanced"

# Per profile: the DiTs' inference chunk in tokens (MemoryProfile.token_chunk).
TOKEN_CHUNK = {name: p.token_chunk for name, p in PROFILES.items()}


def get_profile(name: str) -> MemoryProfile:
    """The profile called ``name``; ``ValueError`` naming the choices otherwise."""
    if not isinstance(name, str) or name not in PROFILES:
        raise ValueError(f"memory must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILES[name]


def resident_profiles() -> tuple[str, ...]:
    """The profiles that keep every component on the device for the whole run (what FSDP's shards need)."""
    return tuple(name for name, p in PROFILES.items() if p.everything_resident)


class MemoryPlan:
    """What is resident on the device in each phase of a generation, for one profile.

    Args:
        profile: a profile's name (:data:`PROFILES`: ``"fast"``, ``"balanced"`` or ``"24gb"``, see the module
            docstring).
        stream_blocks: under ``24gb``, the most transformer blocks whose weights are on the device at once
            (the block running and the one being copied in; at least 1).
        token_chunk: the DiTs' inference chunk in tokens (default: the profile's, :data:`TOKEN_CHUNK`).
        sharded_dits: the DiTs will be sharded over several ranks (FSDP2, ``--fsdp``), which needs ``fast``:
            they are loaded into, and built in, host memory (:meth:`initial` says ``"cpu"`` for them), and the
            sharding moves only each rank's shards and their small unsharded parameters to the device, so no
            rank ever holds a whole DiT there. From then on they are resident as under ``fast``.
    """

    def __init__(self, profile: str = DEFAULT_PROFILE, *, stream_blocks: int = 2, token_chunk: int | None = None,
                 sharded_dits: bool = False) -> None:
        self.settings = get_profile(profile)
        if isinstance(stream_blocks, bool) or not isinstance(stream_blocks, int) or stream_blocks < 1:
            raise ValueError(f"stream_blocks must be an int >= 1, got {stream_blocks!r}")
        if token_chunk is not None and (isinstance(token_chunk, bool) or not isinstance(token_chunk, int)
                                        or token_chunk < 1):
            raise ValueError(f"token_chunk must be an int >= 1 or None, got {token_chunk!r}")
        if sharded_dits and not self.settings.everything_resident:
            raise ValueError(f"sharded DiTs (FSDP) stay resident in every phase: the memory profile must be "
                             f"{' or '.join(resident_profiles())}, got {profile!r}")
        self.profile = profile
        self.stream_blocks = stream_blocks
        self._token_chunk = token_chunk
        self.sharded_dits = bool(sharded_dits)

    @classmethod
    def of(cls, memory) -> "MemoryPlan":
        """``memory`` as a plan: a :class:`MemoryPlan` as is, a profile name, or ``None`` (``balanced``)."""
        if isinstance(memory, MemoryPlan):
            return memory
        if memory is None:
            return cls(DEFAULT_PROFILE)
        if not isinstance(memory, str):
            raise TypeError(f"memory must be a profile name ({', '.join(PROFILES)}) or a MemoryPlan, got "
                            f"{type(memory).__name__}")
        return cls(memory)

    @property
    def token_chunk(self) -> int:
        """The DiTs' inference chunk in tokens (the profile's, :attr:`MemoryProfile.token_chunk`, unless given)."""
        return self.settings.token_chunk if self._token_chunk is None else self._token_chunk

    def placement(self, phase: str, component: str) -> str:
        """Where ``component``'s weights are during ``phase``: ``"device"``, ``"cpu"`` or ``"stream"``."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        rules = self.settings
        if rules.everything_resident:
            return "device"
        if component not in USES[phase]:
            return "cpu"
        if component in DITS and rules.stream_dits:
            return "stream"
        if component == "text_encoder" and rules.text_encoder_on_cpu:
            return "cpu"
        return "device"

    def initial(self, component: str) -> str:
        """Where a component is put when the pipeline is built (and where a loader should read it to):
        ``"device"`` under ``fast``, else ``"cpu"`` (each phase brings what it needs); the DiTs of a plan with
        ``sharded_dits`` in host memory (``"cpu"``), where the sharding finds them."""
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        if self.sharded_dits and component in DITS:
            return "cpu"
        return "device" if self.settings.everything_resident else "cpu"

    def blocks_from_files(self, component: str) -> bool:
        """Whether ``component`` (a DiT) streams blocks read from its weight files on each use
        (:attr:`MemoryProfile.blocks_from_files`)."""
        return self.settings.stream_dits and component in self.settings.blocks_from_files

    def reads_on_use(self, component: str) -> bool:
        """Whether ``component`` is read from its files for the phases that use it and dropped after them
        (:attr:`MemoryProfile.read_on_use`)."""
        return component in self.settings.read_on_use

    def turns(self, component: str) -> tuple[str, ...]:
        """The components ``component`` takes turns on the device with (:data:`TURNS`, itself included), or
        ``()`` when it takes none (a component of no group, or a profile that keeps everything resident)."""
        if self.settings.everything_resident:
            return ()
        return next((group for group in TURNS if component in group), ())

    def runs_on_cpu(self, phase: str, component: str) -> bool:
        """Whether ``component`` computes on the CPU in ``phase`` (it is used there and placed on the CPU)."""
        return component in USES[phase] and self.placement(phase, component) == "cpu"

    def table(self) -> dict[str, dict[str, str]]:
        """``{phase: {component: placement}}`` of the whole plan."""
        return {p: {c: self.placement(p, c) for c in COMPONENTS} for p in PHASES}

    def __repr__(self) -> str:
        extra = ", sharded_dits=True" if self.sharded_dits else ""
        return f"MemoryPlan({self.profile!r}, stream_blocks={self.stream_blocks}{extra})"
