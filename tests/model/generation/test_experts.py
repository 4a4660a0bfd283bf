"""A two-expert Stage I (Wan2.2-I2V-A14B): each step runs the expert diffusers runs, one LoRA and one guidance per
expert, the memory plan's turns, the refusals (never half-loaded), and the A14B plan.

The experts are diffusers' own ``WanTransformer3DModel`` (tiny configs, random weights) written by diffusers'
writer into the layouts the public checkpoints use; the reference for the expert choice is diffusers'
``WanImageToVideoPipeline`` itself, run on the same experts.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from swift_model.generation.experts import expert_plan, runs_high_noise_expert
from swift_model.generation.pipeline import SwiftI2VPipeline
from swift_model.generation.request import GenerationRequest
from swift_model.io.files import CheckpointError
from swift_model.nets.config import WanDiTConfig

from helpers import assert_close_to_scale, diffusers_model, random_dit, random_image, random_init

# the Stage I expert architecture: tiny, Wan2.2 I2V style (36 input channels, no CLIP tokens), as the A14B's
EXPERT = WanDiTConfig.preset("tiny-i2v", image_dim=None)
SIZE = dict(frames=5, width=128, height=128)  # Stage I at 32x32 pixels: 2 latent frames of 4x4
SCHEDULE_4 = [1000.0, 937.5, 833.3333333333334, 625.0]  # our 4-step, shift-5 timesteps (flow_steps)


def _index(root, ratio, *, second=True, extra=None):
    index = {"_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.42.1", "expand_timesteps": False,
             "image_encoder": [None, None], "image_processor": [None, None],
             "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": [None, None],
             "tokenizer": [None, None], "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if second else [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"], **(extra or {})}
    if ratio is not None:
        index["boundary_ratio"] = ratio
    (root / "model_index.json").write_text(json.dumps(index))


SEEDS = (11, 12)  # the experts' random weights: high-noise, low-noise


def a14b_folder(root, ratio=0.9, *, seeds=SEEDS, second=True):
    """A Wan2.2-I2V-A14B-style diffusers folder of tiny random experts (``seeds``: high, low; equal seeds give two
    identical experts) and a tiny Wan2.1 VAE; ``ratio`` ``None`` leaves the ratio out."""
    from diffusers import AutoencoderKLWan

    from swift_model.nets.vae import tiny_config

    root.mkdir(parents=True, exist_ok=True)
    diffusers_model(EXPERT, seeds[0]).save_pretrained(root / "transformer")
    if second:
        diffusers_model(EXPERT, seeds[1]).save_pretrained(root / "transformer_2")
    random_init(AutoencoderKLWan(**tiny_config(16)), 5).save_pretrained(root / "vae")
    _index(root, ratio, second=second)
    return root


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """``(stage2 folder, prompt embeddings file)``: a tiny Wan2.2-TI2V-style Stage II (DiT and VAE) and random
    prompt embeddings."""
    from diffusers import AutoencoderKLWan

    from swift_model.loading.checkpoint import save_dit
    from swift_model.nets.encoders import save_prompt_embeds
    from swift_model.nets.vae import tiny_config

    root = tmp_path_factory.mktemp("stage2")
    save_dit(random_dit("tiny-ti2v", 31), root / "stage2")
    random_init(AutoencoderKLWan(**tiny_config(48)), 32).save_pretrained(root / "stage2" / "vae")
    save_prompt_embeds(str(root / "prompt.safetensors"), torch.randn(1, 8, EXPERT.text_dim))
    return root / "stage2", root / "prompt.safetensors"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("a14b")
    return {r: a14b_folder(root / f"r{r}", r) for r in (0.0, 0.9, 0.95)}


def _pipe(stage1, stage2, **kw):
    return SwiftI2VPipeline.from_pretrained(stage1, stage2[0], load_text_encoder=False, device="cpu", **kw)


def _request(stage2, seed=3, **kw):
    return GenerationRequest(image=random_image(seed, 64, 64), prompt_embeds=stage2[1], seed=seed, **SIZE, **kw)


def _stage1(pipe, request):
    """Stage I's latents of ``request`` (the text encoding and Stage I phases only)."""
    from swift_model.generation.pipeline import GenerationState

    run, state = pipe.prepare(request), GenerationState()
    pipe.run_phase("text_encoding", run, state)
    return pipe.run_phase("stage1", run, state) or state.stage1_latents


def _record(modules):
    """Forward hooks recording ``(expert index, float32 timestep)`` of every call of ``modules``; returns the list
    and the handles."""
    calls, handles = [], []
    for k, m in enumerate(modules):
        def hook(_m, args, kwargs, k=k):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            calls.append((k, float(torch.as_tensor(t).float().reshape(-1)[0])))
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def _diffusers_choices(folder, ratio, scheduler):
    """``(expert, timestep)`` of each call diffusers' ``WanImageToVideoPipeline`` makes on the folder's experts."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

    from swift_model.nets.vae import tiny_config

    # the folder's experts and VAE, drawn again from their seeds (diffusers' loader would need accelerate here)
    high, low = diffusers_model(EXPERT, SEEDS[0]), diffusers_model(EXPERT, SEEDS[1])
    vae = random_init(AutoencoderKLWan(**tiny_config(16)), 5)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=high,
                                   transformer_2=low, boundary_ratio=ratio)
    calls, handles = _record((high, low))
    pipe(image=random_image(1, 32, 32), prompt_embeds=torch.randn(1, 8, EXPERT.text_dim), height=32, width=32,
         num_frames=5, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    for h in handles:
        h.remove()
    return calls


def _our_schedule_scheduler():
    """diffusers' flow-matching Euler scheduler on our 4-step schedule: unshifted sigmas 1, .75, .5, .25, shift 5."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class OurSchedule(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            n = num_inference_steps
            super().set_timesteps(sigmas=[1 - k / n for k in range(n)], device=device)

    return OurSchedule(shift=5.0)


@pytest.mark.parametrize("ratio, high_steps", [(0.0, 4), (0.9, 2), (0.95, 1)])
def test_each_step_runs_the_expert_diffusers_runs(folders, stage2, ratio, high_steps):
    """Our Stage I calls the experts exactly as diffusers' WanImageToVideoPipeline does, step by step, on the same
    schedule (1000, 937.5, 833.3, 625): at 0.9 the first two steps on the high-noise expert."""
    theirs = _diffusers_choices(folders[ratio], ratio, _our_schedule_scheduler())
    pipe = _pipe(folders[ratio], stage2)
    assert pipe.boundary_ratio == ratio
    ours, handles = _record((pipe.stage1, pipe.stage1_2))
    _stage1(pipe, _request(stage2))
    assert ours == theirs
    assert [k for k, _ in ours] == [0] * high_steps + [1] * (4 - high_steps)
    assert [t for _, t in ours] == pytest.approx(SCHEDULE_4)


def test_diffusers_real_scheduler_splits_the_steps_alike():
    """diffusers' UniPC scheduler on flow sigmas, shift 5 (the release's I2V shift), gives 999, 937, 833, 625 for 4
    steps, not our 1000, 937.5, 833.3, 625; at every ratio tested our rule sends its timesteps where its pipeline
    sends them, and at 0.9 both schedules split 2 + 2."""
    from diffusers import UniPCMultistepScheduler

    s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 937, 833, 625]
    for ratio in (0.0, 0.9, 0.95, 0.937, 0.9375, 0.999, 1.0):
        boundary = ratio * s.config.num_train_timesteps
        want = [bool(t >= boundary) for t in s.timesteps]  # diffusers' comparison, on its tensors
        assert [runs_high_noise_expert(t, ratio) for t in s.timesteps.tolist()] == want
        assert [runs_high_noise_expert(t, ratio) for t in SCHEDULE_4[:2]] == [True, ratio <= 0.9375]
    assert [k for k, _ in expert_plan([(t, 0, 0) for t in s.timesteps.tolist()], 0.9, None, None)] == [0, 0, 1, 1]


def test_the_comparison_is_diffusers_float32_one():
    """diffusers compares a float32 timestep tensor with a Python float: a timestep within float32 rounding of the
    boundary counts as reaching it, as there."""
    t = 900.00002  # rounds to 900.0 in float32
    assert bool(torch.tensor(t, dtype=torch.float32) >= 0.9 * 1000) and runs_high_noise_expert(t, 0.9)
    assert not runs_high_noise_expert(899.9999, 0.9)
    assert runs_high_noise_expert(1.0, None)  # one expert: always the first


def test_two_identical_experts_equal_one(tmp_path, stage2):
    """A folder with two identical experts gives bitwise the Stage I of the one-expert folder, under every memory
    profile (balanced swaps the experts, 24gb streams each in turn)."""
    two = a14b_folder(tmp_path / "two", 0.9, seeds=(21, 21))
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(two / "transformer", one / "transformer")
    shutil.copytree(two / "vae", one / "vae")
    _index(one, None, second=False)
    request = _request(stage2, seed=4)
    want = _stage1(_pipe(one, stage2), request)
    assert want.abs().max() > 0
    for memory in ("fast", "balanced", "24gb"):
        pipe = _pipe(two, stage2, memory=memory)
        assert pipe.stage1_2 is not None and torch.equal(_stage1(pipe, request), want), memory
    different = _stage1(_pipe(a14b_folder(tmp_path / "diff", 0.9, seeds=(21, 22)), stage2), request)
    assert not torch.equal(different, want)  # the low-noise expert does run


def _lightx2v_lora(path, seed, rank=4, alpha=2.0):
    """A LoRA in LightX2V's key format (``diffusion_model.`` + original Wan module names, ``lora_A``/``lora_B``,
    ``alpha``) on every attention projection of the tiny expert; returns the factors per module."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for i in range(EXPERT.num_layers):
        for wan, ours in (("self_attn.q", "attn1.to_q"), ("cross_attn.o", "attn2.to_out.0")):
            down = torch.randn(rank, EXPERT.dim, generator=g)
            up = torch.randn(EXPERT.dim, rank, generator=g)
            key = f"diffusion_model.blocks.{i}.{wan}"
            tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)})
            factors[f"blocks.{i}.{ours}.weight"] = (alpha / rank) * up.double() @ down.double()
    save_file(tensors, str(path))
    return factors


def test_each_lora_lands_on_its_expert_only(tmp_path, stage2):
    folder = a14b_folder(tmp_path / "a14b", 0.9)
    high_lora, low_lora = tmp_path / "high_noise_model.safetensors", tmp_path / "low_noise_model.safetensors"
    deltas = (_lightx2v_lora(high_lora, 1), _lightx2v_lora(low_lora, 2))
    base = _pipe(folder, stage2)
    merged = _pipe(folder, stage2, stage1_lora=str(high_lora), stage1_lora_2=str(low_lora), lora_scale=0.5)
    only_low = _pipe(folder, stage2, stage1_lora_2=str(low_lora), lora_scale=0.5)
    for k, (plain, got) in enumerate(((base.stage1, merged.stage1), (base.stage1_2, merged.stage1_2))):
        want = {n: p.double() + 0.5 * deltas[k].get(n, 0) for n, p in plain.state_dict().items()}
        for n, p in got.state_dict().items():
            torch.testing.assert_close(p.double(), want[n], rtol=0, atol=1e-5, msg=f"expert {k}: {n}")
    for n, p in only_low.stage1.state_dict().items():  # the high-noise expert untouched by the low one's LoRA
        assert torch.equal(p, base.stage1.state_dict()[n]), n
    assert not torch.equal(only_low.stage1_2.blocks[0].attn1.to_q.weight, base.stage1_2.blocks[0].attn1.to_q.weight)


def test_guidance_per_expert(folders, stage2, monkeypatch):
    """guidance_scale_2 guides the low-noise expert's steps and defaults to guidance_scale, as diffusers'."""
    from swift_model.generation import pipeline as pipeline_module

    used = []
    real = pipeline_module.flow_update

    def spy(*args, **kw):
        used.append(kw.get("guidance"))
        return real(*args, **kw)

    monkeypatch.setattr(pipeline_module, "flow_update", spy)
    pipe = _pipe(folders[0.9], stage2)
    request = _request(stage2, guidance_scale=3.0, negative_prompt_embeds=torch.randn(1, 8, EXPERT.text_dim))
    _stage1(pipe, request.replace(guidance_scale_2=1.5))
    _stage1(pipe, request)
    assert used == [3.0, 3.0, 1.5, 1.5, 3.0, 3.0, 3.0, 3.0]


def test_refusals(tmp_path, stage2, folders):
    """Never half-loaded, never guessed: each refusal names the file (and the key)."""
    from swift_model.loading.checkpoint import load_dit
    from swift_model.loading.preflight import check_checkpoints

    no_ratio = a14b_folder(tmp_path / "no_ratio", None)
    with pytest.raises(CheckpointError, match=r"model_index\.json: boundary_ratio: .*never guessed"):
        _pipe(no_ratio, stage2)
    (no_ratio / "model_index.json").unlink()  # transformer_2/ with no index at all
    with pytest.raises(CheckpointError, match=r"model_index\.json: a transformer_2/ folder"):
        check_checkpoints(no_ratio)
    extra = a14b_folder(tmp_path / "extra", 0.9)
    _index(extra, 0.9, extra={"controlnet": ["diffusers", "WanControlNet"]})
    with pytest.raises(CheckpointError, match=r"model_index\.json: controlnet: .*does not use"):
        check_checkpoints(extra)
    _index(extra, 0.9, extra={"image_encoder": ["transformers", "CLIPVisionModel"]})  # the experts take no CLIP
    with pytest.raises(CheckpointError, match=r"model_index\.json: image_encoder: .*no image tokens"):
        check_checkpoints(extra)
    bad = a14b_folder(tmp_path / "bad", 1.5)
    with pytest.raises(CheckpointError, match=r"boundary_ratio: .*\[0, 1\]"):
        check_checkpoints(bad)
    unnamed = a14b_folder(tmp_path / "unnamed", None)
    _index(unnamed, None, second=False)  # transformer_2/ on disk, not in the index
    with pytest.raises(CheckpointError, match="does not name it"):
        check_checkpoints(unnamed)
    # a two-expert folder where one DiT is loaded: Stage II, or WanDiT.from_pretrained
    with pytest.raises(CheckpointError, match="stage2: .*holds two experts"):
        check_checkpoints(None, folders[0.9])
    with pytest.raises(CheckpointError, match="holds two experts"):
        load_dit(folders[0.9])
    # per-expert settings with one expert
    one = a14b_folder(tmp_path / "one", None, second=False)
    with pytest.raises(ValueError, match="stage1_lora_2 .*one DiT"):
        check_checkpoints(one, stage1_lora_2=str(tmp_path / "x.safetensors"), need_text_encoder=False)
    with pytest.raises(ValueError, match="guidance_scale_2 needs guidance_scale"):
        GenerationRequest(guidance_scale_2=2.0)
    pipe = SwiftI2VPipeline.tiny(stage2_kind="refine", device="cpu")
    with pytest.raises(ValueError, match="guidance_scale_2 .*one DiT"):
        pipe.prepare(GenerationRequest(image=random_image(0, 64, 64), prompt="p", guidance_scale=2.0,
                                       guidance_scale_2=3.0, **SIZE))


def test_the_plan_of_a_folder_reads_both_experts(folders, stage2):
    """``swift-i2v plan --stage1 FOLDER`` plans both experts with the folder's ratio (configs only)."""
    from swift_model.loading.preflight import checkpoint_spec

    spec = checkpoint_spec(folders[0.95], stage2[0], load_text_encoder=False)
    assert spec.stage1_2 == spec.stage1 and spec.boundary_ratio == 0.95


def test_experts_must_take_the_same_inputs(tmp_path):
    from swift_model.loading.preflight import check_checkpoints

    folder = a14b_folder(tmp_path / "mixed", 0.9)
    shutil.rmtree(folder / "transformer_2")
    diffusers_model(EXPERT.replace(in_channels=16), 3).save_pretrained(folder / "transformer_2")
    with pytest.raises(CheckpointError, match=r"transformer_2: .*same inputs: in_channels 36 vs 16"):
        check_checkpoints(folder)


def test_original_layout(tmp_path, stage2, folders):
    """The original release's layout: high_noise_model/ and low_noise_model/ (original Wan keys), the Wan2.1 VAE
    file beside them; the ratio is the release's I2V one (0.9), and the experts load as the diffusers folder's."""
    from swift_model.loading.checkpoint import save_dit

    ref = _pipe(folders[0.9], stage2)
    root = tmp_path / "Wan2.2-I2V-A14B"
    save_dit(ref.stage1, root / "high_noise_model", format="wan")
    save_dit(ref.stage1_2, root / "low_noise_model", format="wan")
    shutil.copytree(folders[0.9] / "vae", root / "vae")
    pipe = _pipe(root, stage2)
    assert pipe.boundary_ratio == 0.9
    for got, want in ((pipe.stage1, ref.stage1), (pipe.stage1_2, ref.stage1_2)):
        assert all(torch.equal(p, want.state_dict()[n]) for n, p in got.state_dict().items())
    cfg = json.loads((root / "high_noise_model" / "config.json").read_text())
    (root / "high_noise_model" / "config.json").write_text(json.dumps({**cfg, "model_type": "t2v"}))
    with pytest.raises(CheckpointError, match=r"high_noise_model/config\.json: model_type: .*never guessed"):
        _pipe(root, stage2)
    shutil.rmtree(root / "low_noise_model")
    with pytest.raises(CheckpointError, match="low_noise_model/ is missing"):
        _pipe(root, stage2)


def _tiny_two_expert_spec(ratio):
    from swift_model.nets.spec import ModelSpec

    spec = ModelSpec.tiny("refine")
    return dataclasses.replace(spec, stage1_2=spec.stage1, boundary_ratio=ratio)


def test_the_plan_swaps_the_experts_under_balanced():
    """Under balanced one expert is on the device at a time: the peak is the one-expert plan's, and the swap's copy is
    counted in the stage1 phase's h2d_bytes; under fast both are resident and nothing moves; at ratio 0 the
    low-noise expert never comes in."""
    from swift_model.nets.spec import ModelSpec
    from swift_model.planning.planner import plan_generation

    one = ModelSpec.tiny("refine")
    size = dict(frames=9, width=128, height=64, phases=("stage1",))
    expert_bytes = sum(p.numel() * p.element_size() for p in
                       SwiftI2VPipeline.from_spec(one, device="cpu", dtype=torch.bfloat16).stage1.parameters())
    base = plan_generation(one, memory="balanced", **size).phases["stage1"]
    two = plan_generation(_tiny_two_expert_spec(0.9), memory="balanced", **size)
    s1 = two.phases["stage1"]
    assert s1["h2d_bytes"] == base["h2d_bytes"] + expert_bytes
    # one expert at a time: the peak is the one-expert plan's (within a few previous-step tensors, 6 KiB here), far
    # from both experts' weights
    assert base["peak_bytes"] <= s1["peak_bytes"] <= base["peak_bytes"] * 1.01 < base["peak_bytes"] + expert_bytes
    assert set(two.info["resident"]["stage1"]) >= {"stage1", "stage1_2"}
    zero = plan_generation(_tiny_two_expert_spec(0.0), memory="balanced", **size).phases["stage1"]
    assert zero["h2d_bytes"] == base["h2d_bytes"]
    fast = plan_generation(_tiny_two_expert_spec(0.9), memory="fast", **size).phases["stage1"]
    assert fast["h2d_bytes"] == 0


@pytest.mark.slow
def test_a14b_plan_fits_60_gib_balanced(capsys):
    """swift-i2v plan --stage1-preset wan2.2-i2v-a14b (an estimate): <= 60 GiB under balanced at 2560x1408x81, and
    the Stage I phase copies in both experts (2 x 14.3B bf16 parameters)."""
    from swift_model.cli.main import main

    assert main(["plan", "--stage1-preset", "wan2.2-i2v-a14b", "--memory", "balanced", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_bytes"] <= 60 * 2**30
    expert = WanDiTConfig.preset("wan2.2-i2v-a14b")
    with torch.device("meta"):
        from swift_model.nets.dit import WanDiT

        nbytes = sum(p.numel() * 2 for p in WanDiT(expert).parameters())
    assert plan["phases"]["stage1"]["h2d_bytes"] >= 2 * nbytes * 0.99


def test_the_a14b_preset_and_its_checks():
    """The preset is two experts of one architecture with the published ratio; a spec or a pipeline with half of a
    two-expert Stage I is refused."""
    from swift_model.nets.spec import ModelSpec

    spec = ModelSpec.preset("wan2.2-i2v-a14b")
    assert spec.stage1_2 == spec.stage1 and spec.boundary_ratio == 0.9 and spec.image_encoder is None
    assert ModelSpec.preset("wan2.1-i2v-14b").stage1_2 is None
    with pytest.raises(ValueError, match="both stage1_2 and boundary_ratio"):
        dataclasses.replace(spec, boundary_ratio=None)
    with pytest.raises(ValueError, match=r"boundary_ratio must be in \[0, 1\]"):
        dataclasses.replace(spec, boundary_ratio=-0.1)
    with pytest.raises(ValueError, match="same inputs: num_heads 40 vs 20"):
        dataclasses.replace(spec, stage1_2=spec.stage1.replace(num_heads=20))
    pipe = SwiftI2VPipeline.tiny(stage2_kind="refine", device="cpu")
    with pytest.raises(ValueError, match="two-expert Stage I needs"):
        SwiftI2VPipeline(pipe.stage1, pipe.stage2, pipe.vae1, pipe.vae2, stage2_kind="refine", device="cpu",
                         stage1_2=pipe.stage1)


@pytest.mark.gpu
@pytest.mark.parametrize("memory", ["balanced", "24gb"])
def test_the_expert_swap_on_a_gpu(tmp_path, stage2, memory):
    """On a GPU: two identical experts give the one-expert Stage I (both in fp32), the swap copies the low-noise
    expert in once (counted in the stage1 phase's h2d_bytes) and the high-noise one has left the GPU when the
    low-noise one runs."""
    two = a14b_folder(tmp_path / "two", 0.9, seeds=(21, 21))
    request = _request(stage2, seed=6)
    pipe = SwiftI2VPipeline.from_pretrained(two, stage2[0], load_text_encoder=False, device="cuda",
                                            dtype=torch.float32, memory=memory, vae_dtype="fp32")
    where = []
    pipe.stage1_2.register_forward_pre_hook(
        lambda m, a: where.append(next(pipe.stage1.blocks[0].parameters()).device.type))
    pipe.residency.h2d_bytes.clear()
    got = _stage1(pipe, request).cpu()
    swapped = pipe.residency.h2d_bytes["stage1"]
    assert where == ["cpu", "cpu"]  # the high-noise expert's blocks are off the GPU while the low-noise one runs
    pipe.stage1_2 = None  # the same pipeline as one expert (identical weights): no swap
    pipe.boundary_ratio = None
    pipe.residency.h2d_bytes.clear()
    want = _stage1(pipe, request).cpu()
    low_blocks = sum(p.numel() * p.element_size() for p in pipe.stage1.blocks.parameters())
    assert swapped >= pipe.residency.h2d_bytes["stage1"] + low_blocks
    # the same weights through other copies and buffers: equal to fp32 rounding (a GPU may pick other kernels for
    # other addresses)
    assert_close_to_scale(got, want, rtol=1e-5)
