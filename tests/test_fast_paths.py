"""The speed and memory options: --compile (one graph, no recompiles, the eager numbers, a way out),
--grad_checkpointing (the same gradients from fewer stored activations) and --channels_last."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from models import GaussianDiffusion, Unet, Unet3D
from models.compiled import checkpoint_blocks, compiled
from trainer.errors import ConfigError
from test_trainer import make_trainer, tiny_config, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(**kw):
    return Unet(dim=8, dim_mults=(1, 2), channels=2, attn_heads=1, attn_dim_head=8, **kw)


def loss_and_grads(diffusion, x0, seed, **kw):
    diffusion.zero_grad(set_to_none=True)
    loss = diffusion(x0, generator=torch.Generator().manual_seed(seed), **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in diffusion.named_parameters() if p.grad is not None}


def test_the_compiled_loss_is_one_graph_with_the_eager_numbers_and_never_recompiles():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = tiny_unet(self_condition=True, cond_channels=1, cond_dim=2)
    diffusion = GaussianDiffusion(net, sample_shape=(2, 8, 8), timesteps=50)
    x0 = torch.randn(3, 2, 8, 8)
    cond = {"fields": torch.randn(3, 1, 8, 8), "params": torch.randn(3, 2)}
    # Seeds whose self-conditioning coins fall both ways, so that both compiled branches run.
    coins, coin = {}, diffusion._self_condition_coin
    for seed in range(8):
        diffusion._self_condition_coin = lambda g: coins.setdefault(seed, coin(g))
        diffusion(x0, cond=cond, generator=torch.Generator().manual_seed(seed))
    del diffusion._self_condition_coin
    seeds = [next(s for s, c in coins.items() if c), next(s for s, c in coins.items() if not c)]
    eager = [loss_and_grads(diffusion, x0, s, cond=cond) for s in seeds]

    diffusion.compile_loss(backend="aot_eager")
    for seed, (loss, grads) in zip(seeds, eager):
        c_loss, c_grads = loss_and_grads(diffusion, x0, seed, cond=cond)
        assert torch.equal(c_loss, loss)
        for name, g in grads.items():
            torch.testing.assert_close(c_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # one per self-conditioning branch: fullgraph, no break
    for seed in range(8):  # new noise, timesteps and coins: the same two graphs serve them all
        loss_and_grads(diffusion, x0, 100 + seed, cond=cond)
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_unet3d_loss_with_given_frames_traces_as_one_graph():
    torch._dynamo.reset()
    counters.clear()
    net = Unet3D(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    diffusion = GaussianDiffusion(net, sample_shape=(1, 4, 8, 8), timesteps=50, cond_steps=1)
    diffusion.compile_loss(backend="eager")  # dynamo alone: the check is the graph, not the kernels
    x0 = torch.randn(2, 1, 4, 8, 8)
    for seed in range(3):
        loss_and_grads(diffusion, x0, seed)
    assert counters["stats"]["unique_graphs"] == 1


def test_einops_operations_enter_the_graph_as_single_calls():
    """Traced through, einops' pattern parsing is redone at every call site (most of what dynamo inlined, and a
    guard on einops' backend registry that recompiled the loss once einops met numpy arrays at a save)."""
    import einops
    import numpy as np

    torch._dynamo.reset()
    targets = []

    def recording(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    net = compiled(tiny_unet(), name="the tiny Unet", backend=recording)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        net(x, t)
        nodes = targets.count(einops.rearrange)
        assert nodes >= 4  # time embedding, scale-shift, attention: each one node
        einops.rearrange(np.zeros((2, 3)), "a b -> b a")  # a new array type for einops, as image grids bring
        net(x, t)
    assert targets.count(einops.rearrange) == nodes  # the same graph ran: no recompile, no new nodes


def test_a_function_that_cannot_compile_warns_once_and_runs_eagerly(caplog):
    torch._dynamo.reset()

    def breaks(x):
        return x * 2 if x.sum().item() > 0 else x  # a host read: no single graph

    fast = compiled(breaks, name="the test function", backend="eager")
    x = torch.ones(3)
    with caplog.at_level(logging.WARNING, logger="models.compiled"):
        assert torch.equal(fast(x), x * 2)
        assert torch.equal(fast(-x), -x)
    warnings = [r.message for r in caplog.records if "torch.compile of the test function failed" in r.message]
    assert len(warnings) == 1 and "runs eagerly" in warnings[0]


def test_a_failure_of_the_function_itself_is_raised_not_hidden():
    torch._dynamo.reset()
    fast = compiled(lambda x: x @ x, name="matmul", backend="eager")
    with pytest.raises(RuntimeError):
        fast(torch.ones(2, 3))


@pytest.mark.parametrize("make", [
    lambda: tiny_unet(dropout=0.3),
    lambda: Unet3D(dim=8, dim_mults=(1, 2), channels=2, attn_heads=1, attn_dim_head=8, dropout=0.3),
], ids=["unet", "unet3d"])
def test_grad_checkpointing_gives_the_same_gradients_from_fewer_stored_activations(make):
    torch.manual_seed(0)
    net = make()
    shape = (2, 2, 8, 8) if isinstance(net, Unet) else (2, 2, 3, 8, 8)
    x, t = torch.randn(shape), torch.tensor([3, 40])

    def run():
        saved = []
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # dropout: the same draws in both runs
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel()) or s, lambda s: s):
            out = net(x, t)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, sum(saved)

    out, grads, stored = run()
    assert checkpoint_blocks(net) > 0
    out_c, grads_c, stored_c = run()
    assert torch.equal(out_c, out)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert stored_c < 0.5 * stored


def test_training_compiled_with_checkpointing_matches_eager(tmp_path):
    torch._dynamo.reset()
    for name in ("eager", "fast"):
        (tmp_path / name).mkdir()
    eager = make_trainer(tmp_path / "eager", train_num_steps=3, save_and_sample_every=100, self_condition=True)
    eager.train()
    fast = make_trainer(tmp_path / "fast", train_num_steps=3, save_and_sample_every=100, self_condition=True,
                        compile=True, compile_backend="eager", grad_checkpointing=True)
    fast.train()
    assert fast.diffusion._compiled_losses is not None
    for name, w in weights(eager.strategy.net).items():
        torch.testing.assert_close(weights(fast.strategy.net)[name], w, rtol=1e-5, atol=1e-6, msg=name)
    samples = fast.sample(2)[0]  # through the compiled sampling network
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()
    torch.testing.assert_close(samples, eager.sample(2)[0], rtol=1e-4, atol=1e-4)


def test_the_2d_unet_trains_channels_last_by_default(tmp_path):
    for name in ("cl", "plain"):
        (tmp_path / name).mkdir()
    default = make_trainer(tmp_path / "cl", train_num_steps=2, save_and_sample_every=100)
    assert default.strategy.net.init_conv.weight.is_contiguous(memory_format=torch.channels_last)
    layouts, loss = [], default.strategy.loss
    default.strategy.loss = lambda x0, **kw: layouts.append(x0.is_contiguous(memory_format=torch.channels_last)) \
        or loss(x0, **kw)
    default.train()
    assert layouts == [True, True]
    plain = make_trainer(tmp_path / "plain", train_num_steps=2, save_and_sample_every=100, channels_last=False)
    assert plain.strategy.net.init_conv.weight.is_contiguous()
    plain.train()
    for name, w in weights(plain.strategy.net).items():  # the same numbers, up to rounding
        torch.testing.assert_close(weights(default.strategy.net)[name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_is_refused_for_clips():
    from trainer.config import validate

    cfg = tiny_config(model="unet3d", dataset="moving_shapes", frames=4, channels_last=True)
    with pytest.raises(ConfigError, match="--channels_last true applies to the 2D Unet"):
        validate(cfg)
