"""Call inputs put on the device ahead of the calls: ``WanDiT.prepare_call`` (the RoPE table and the per-frame
timesteps' device tensors, reused by the calls), ``forward(rope_table=...)`` and ``DeviceFrameTimesteps`` (the
timestep values read from a device tensor: a CUDA graph's static input). Each gives the bits of the plain call."""

from __future__ import annotations

import pytest
import torch

from swift_model.nets.dit import DeviceFrameTimesteps, FrameTimesteps

from helpers import dit_inputs, random_dit


@pytest.fixture(scope="module")
def model():
    return random_dit("tiny-ti2v", seed=21).eval()


def _call(model, steps, positions=(0, 3, 4), **kw):
    x, _, ctx, clip = dit_inputs(model.config, B=1, Fr=3, seed=4)
    with torch.no_grad():
        return model(x, steps, ctx, clip, frame_positions=positions, **kw), x


def test_prepared_call_reuses_its_device_inputs_and_gives_the_same_bits(model):
    steps = FrameTimesteps((0.0, 612.5, 612.5))
    model.host_input_cache.clear()
    want, x = _call(model, steps)
    model.host_input_cache.clear()
    rope = model.prepare_call(x.shape, (0, 3, 4), [steps, FrameTimesteps((0.0, 250.0, 250.0))])
    prepared = dict(model.host_input_cache)
    assert len(prepared) == 2
    got, _ = _call(model, steps)
    assert torch.equal(got, want)
    # the call found its tensors prepared: it made none, and used the prepared ones
    assert model.host_input_cache.keys() == prepared.keys()
    assert all(model.host_input_cache[k] is prepared[k] for k in prepared)
    assert rope is model.prepare_call(x.shape, (0, 3, 4))  # the cached table
    with pytest.raises(ValueError, match="FrameTimesteps of 3 frames"):
        model.prepare_call(x.shape, (0, 3, 4), [FrameTimesteps((0.0, 1.0))])
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        model.prepare_call(x.shape[1:])


def test_rope_table_argument_replaces_the_lookup(model):
    steps = FrameTimesteps((0.0, 612.5, 612.5))
    want, x = _call(model, steps, positions=(0, 5, 6))
    table = model.prepare_call(x.shape, (0, 5, 6)).clone()
    got, _ = _call(model, steps, positions=(0, 5, 6), rope_table=table)
    assert torch.equal(got, want)
    # another window's table changes the result: the argument is what the call uses
    other = model.prepare_call(x.shape, (0, 1, 2)).clone()
    moved, _ = _call(model, steps, positions=(0, 5, 6), rope_table=other)
    assert not torch.equal(moved, want)
    with pytest.raises(ValueError, match="rope_table must be a tensor of"):
        _call(model, steps, rope_table=table[1:])


@pytest.mark.parametrize("values", [(0.0, 937.5, 937.5), (400.0, 400.0, 400.0), (0.0, 250.0, 900.0)])
def test_device_frame_timesteps_read_their_values_from_the_device_tensor(model, values):
    """The structure comes from the host FrameTimesteps, the values from the tensor: the same bits as the
    FrameTimesteps of those values, and another step's values copied in give that step's call."""
    steps = FrameTimesteps(values)
    distinct = torch.tensor(steps.distinct()[0], dtype=torch.float32)
    want, _ = _call(model, steps)
    got, _ = _call(model, DeviceFrameTimesteps(steps, distinct.clone()))
    assert torch.equal(got, want)
    later = FrameTimesteps(tuple(0.0 if v == 0 else v * 0.5 for v in values))  # the same structure
    static = distinct.clone()
    static.copy_(torch.tensor(later.distinct()[0], dtype=torch.float32))
    got, _ = _call(model, DeviceFrameTimesteps(steps, static))
    want, _ = _call(model, later)
    assert torch.equal(got, want)


def test_device_frame_timesteps_checks():
    steps = FrameTimesteps((0.0, 5.0, 5.0))
    with pytest.raises(ValueError, match=r"float32 tensor \[2\]"):
        DeviceFrameTimesteps(steps, torch.zeros(3))
    with pytest.raises(ValueError, match=r"float32 tensor \[2\]"):
        DeviceFrameTimesteps(steps, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a FrameTimesteps"):
        DeviceFrameTimesteps((0.0, 5.0, 5.0), torch.zeros(2))
    assert len(DeviceFrameTimesteps(steps, torch.zeros(2))) == 3
