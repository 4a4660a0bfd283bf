"""Stage I LoRA training at the low resolution: the trained adapter, saved, is what the LoRA loader merges, and
``swift-i2v train-lora`` writes a file ``generate --stage1-lora`` loads."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_checkpoints, write_videos
from swift_model import WanDiT, merge_lora
from swift_model.loading.checkpoint import save_dit
from swift_model.cli import main
from swift_model.training.stage1_lora import TARGETS, LoraAdapters, encode_clip, train_stage1_lora


def _clips(pipe, n=2, frames=5, size=32):
    g = torch.Generator().manual_seed(11)
    ctx = torch.randn(1, 8, pipe.stage1.config.text_dim, generator=g)
    return [encode_clip(pipe.stage1, pipe.vae1, torch.rand(3, frames, size, size, generator=g) * 2 - 1, ctx,
                        pipe.image_encoder) for _ in range(n)]


def test_trained_lora_file_merges_to_the_trained_weights(tiny_pipe, tmp_path):
    """Two training steps change the adapter; its file, read by the LoRA loader (from_pretrained(lora=) and
    merge_lora), gives exactly ``W + (alpha/rank) * up @ down`` on every target and the base elsewhere, and the
    merged model computes what the hooked model computed (fp32 rounding)."""
    base = copy.deepcopy(tiny_pipe.stage1)
    clips = _clips(tiny_pipe)
    adapters, losses = train_stage1_lora(base, clips, rank=4, alpha=2.0, steps=2, lr=1e-2, seed=3, progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.abs().max() > 0 for p in adapters.up)  # trained (up starts at zero)
    assert len(adapters.names) == len(base.blocks) * len(TARGETS)
    for p_base, p_tiny in zip(base.parameters(), tiny_pipe.stage1.parameters()):
        assert torch.equal(p_base, p_tiny)  # the base itself is untouched
    path = tmp_path / "lora.safetensors"
    adapters.save(path)
    save_dit(base, tmp_path / "ckpt")
    loaded = WanDiT.from_pretrained(tmp_path / "ckpt", device="cpu", lora=path)
    merged = merge_lora(copy.deepcopy(base), path)
    params = dict(base.named_parameters())
    for model in (loaded, merged):
        for name, p in model.named_parameters():
            mod = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and mod in adapters.names:
                want = (params[name].float() + adapters.delta(mod)).to(p.dtype)
                assert torch.equal(p, want), name
            else:
                assert torch.equal(p, params[name]), name
    clip = clips[0]
    noise = torch.randn(clip.z.shape, generator=torch.Generator().manual_seed(0))
    from swift_model.training.stage1_lora import lora_loss

    with torch.no_grad():
        adapters.attach()
        try:
            hooked = lora_loss(base, clip, 0.7, noise)
        finally:
            adapters.detach()
        plain = lora_loss(base, clip, 0.7, noise)
        merged_loss = lora_loss(merged, clip, 0.7, noise)
    torch.testing.assert_close(merged_loss, hooked, rtol=1e-5, atol=0)
    assert not torch.allclose(plain, hooked, rtol=1e-4, atol=0)  # the adapter does change the model


def test_lora_training_is_seeded_and_learns(tiny_pipe):
    """The same seed gives the same adapter; a few dozen steps on two clips lower the loss on them (measured at
    fixed noise levels and noise, not the training draws)."""
    base = copy.deepcopy(tiny_pipe.stage1)
    clips = _clips(tiny_pipe)
    a, _ = train_stage1_lora(base, clips, rank=2, steps=2, lr=1e-2, seed=5, progress=False)
    b, _ = train_stage1_lora(base, clips, rank=2, steps=2, lr=1e-2, seed=5, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    g = torch.Generator().manual_seed(1)
    probe = [(c, s, torch.randn(c.z.shape, generator=g)) for c in clips for s in (0.3, 0.6, 0.9)]

    def loss(adapters=None):
        from swift_model.training.stage1_lora import lora_loss

        if adapters is not None:
            adapters.attach()
        try:
            with torch.no_grad():
                return sum(float(lora_loss(base, c, s, n)) for c, s, n in probe) / len(probe)
        finally:
            if adapters is not None:
                adapters.detach()

    trained, _ = train_stage1_lora(base, clips, rank=8, steps=40, lr=3e-3, seed=0, timestep_sampling="uniform",
                                   progress=False)
    before, after = loss(), loss(trained)
    assert after < 0.9 * before, (before, after)


def test_adapter_arguments():
    from swift_model import WanDiTConfig

    dit = WanDiT(WanDiTConfig.preset("tiny-i2v"))
    with pytest.raises(ValueError, match="rank"):
        LoraAdapters(dit, rank=0)
    with pytest.raises(ValueError, match="not a linear layer"):
        LoraAdapters(dit, targets=("ffn.net.0",))
    with pytest.raises(ValueError, match="no LoRA target"):
        LoraAdapters(dit, targets=("nothing",))
    with pytest.raises(ValueError, match="no training clips"):
        train_stage1_lora(dit, [], steps=1)


def test_train_lora_command_writes_a_file_generate_loads(tmp_path, capsys):
    root = tmp_path
    s1, s2, emb = tiny_checkpoints(root)
    write_videos(root / "videos", range(2), frames=5, size=64)
    out = root / "stage1-lora.safetensors"
    cmd = ["train-lora", "--videos", str(root / "videos"), "--prompt-embeds", str(emb), "--stage1", str(s1),
           "--out", str(out), "--frames", "5", "--width", "32", "--height", "32", "--rank", "2", "--steps", "2",
           "--lr", "1e-2", "--quiet"]
    assert main(cmd) == 0
    said = capsys.readouterr().out
    assert "rank-2 Stage I LoRA on 2 clips for 2 steps" in said and out.is_file()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 90)).save(root / "in.png")
    gen = ["generate", "--image", str(root / "in.png"), "--prompt-embeds", str(emb), "--stage1", str(s1), "--stage2",
           str(s2), "--frames", "5", "--width", "64", "--height", "64", "--quiet"]
    from swift_model.io.video import read_mp4

    assert main(gen + ["--out", str(root / "plain.mp4")]) == 0
    assert main(gen + ["--out", str(root / "lora.mp4"), "--stage1-lora", str(out), "--lora-scale", "50"]) == 0
    assert not (read_mp4(str(root / "plain.mp4")) == read_mp4(str(root / "lora.mp4"))).all()
    capsys.readouterr()
    assert main(cmd[:2] + [str(root / "none")] + cmd[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "videos folder not found" in err[0]
    assert main(cmd + ["--out", str(root / "x.pt")]) == 2  # the last --out counts
    assert "must be a .safetensors file" in capsys.readouterr().err
