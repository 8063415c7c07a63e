"""The DeCaFA model: shapes, gradients to every stage, config, parameter count, overfitting one batch."""
from __future__ import annotations

import pytest
import torch

from decafa_fast.app.evaluation.metrics import nme
from decafa_fast.app.model import DeCaFA, DeCaFAConfig, count_parameters, decafa_loss

TINY = dict(widths=(4, 8, 8), embedding_channels=4, image_size=16)
FUSIONS = ("F1", "F2", "F3", "F4", "F5")


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shapes(stages, fusion):
    torch.manual_seed(0)
    model = DeCaFA(DeCaFAConfig(stages=stages, fusion=fusion, **TINY))
    out = model(torch.rand(2, 1, 16, 20))  # non-square, widths not a power of two of the size
    assert len(out) == stages
    for stage in out:
        assert [tuple(z.shape) for z in stage] == [(2, 98, 2), (2, 68, 2), (2, 5, 2)]
        for z in stage:
            assert z.dtype == torch.float32 and torch.isfinite(z).all()
            # pixel coordinates: x in [0, W-1], y in [0, H-1]
            z = z.detach()
            assert float(z[..., 0].min()) >= 0 and float(z[..., 0].max()) <= 19
            assert float(z[..., 1].min()) >= 0 and float(z[..., 1].max()) <= 15


def test_odd_size_batch_of_one_and_independent_transfer():
    model = DeCaFA(DeCaFAConfig(stages=2, transfer="independent", attention_markup=2, **TINY)).eval()
    out = model(torch.rand(1, 1, 13, 11))
    assert out[-1][0].shape == (1, 98, 2)
    # independent transfers all read the embedding
    assert all(layer.in_channels == 4 for layer in model.transfers[0].layers)
    chained = DeCaFA(DeCaFAConfig(stages=1, **TINY))
    assert [layer.in_channels for layer in chained.transfers[0].layers] == [4, 98, 68]


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradients_reach_every_stage(fusion):
    """A loss on the last stage alone sends gradient to every stage through the fusion (and, for F2, the mask)."""
    torch.manual_seed(0)
    model = DeCaFA(DeCaFAConfig(stages=3, fusion=fusion, **TINY))
    out = model(torch.rand(2, 1, 16, 16))
    out[-1][0].square().mean().backward()
    for i, (unet, _transfer) in enumerate(zip(model.stages, model.transfers)):
        assert unet.down0[0][0].weight.grad is not None, f"stage {i}"
        assert unet.down0[0][0].weight.grad.abs().sum() > 0, f"stage {i} gets no gradient with {fusion}"
    # the attention transfer (markup k0 = 98 points) of the earlier stages shapes the mask
    if fusion != "F1":
        assert model.transfers[0].layers[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_full_loss_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    model = DeCaFA(DeCaFAConfig(stages=2, **TINY))
    out = model(torch.rand(2, 1, 16, 16))
    targets = {name: torch.rand(2, n, 2) * 15 for name, n in zip(model.markups, (98, 68, 5))}
    valid = {name: torch.ones(2, dtype=torch.bool) for name in model.markups}
    decafa_loss(out, targets, valid, model.markups, model.config.stage_lambdas()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_config_defaults_roundtrip_and_validation():
    cfg = DeCaFAConfig()
    assert (cfg.stages, cfg.markups, cfg.transfer, cfg.fusion, cfg.lambdas) == (
        4, ("wflw98", "300w68", "celeba5"), "chained", "F5", "increasing")
    assert cfg.stage_lambdas() == [0.125, 0.25, 0.5, 1.0]
    d = cfg.to_dict()
    assert d["widths"] == [64, 128, 256] and isinstance(d["markups"], list)
    assert DeCaFAConfig.from_dict(d) == cfg
    custom = DeCaFAConfig(lambdas=[1, 2, 3, 4])
    assert DeCaFAConfig.from_dict(custom.to_dict()) == custom
    for bad in (dict(fusion="F6"), dict(transfer="x"), dict(stages=0), dict(markups=("celeba5", "wflw98")),
                dict(attention_markup=3), dict(lambdas=[1.0]), dict(widths=(8, 8)), dict(beta=0.0)):
        with pytest.raises(ValueError):
            DeCaFAConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        DeCaFAConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="shape"):
        DeCaFA(DeCaFAConfig(stages=1, **TINY))(torch.rand(1, 3, 16, 16))


def test_paper_model_has_about_ten_million_parameters():
    n = count_parameters(DeCaFA(DeCaFAConfig()))
    print(f"DeCaFA S=4 parameters: {n}")
    assert 9e6 < n < 11.5e6


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    """A small model drives the NME of one fixed batch below one pixel in a bounded number of steps."""
    torch.manual_seed(0)
    from decafa_fast.app.data import SyntheticFaces, collate_faces

    batch = collate_faces([SyntheticFaces(4, size=32, seed=3, markups=("celeba5",))[i] for i in range(4)])
    images, target = batch["image"], batch["landmarks"]["celeba5"]
    model = DeCaFA(DeCaFAConfig(stages=1, markups=("celeba5",), widths=(8, 16, 16), embedding_channels=8,
                                image_size=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    valid = {"celeba5": torch.ones(4, dtype=torch.bool)}
    for step in range(400):  # noqa: B007 - the count is reported after the loop
        out = model(images)
        error = (out[-1][0].detach() - target).norm(dim=-1).mean().item()
        if error < 1.0:
            break
        loss = decafa_loss(out, {"celeba5": target}, valid, ("celeba5",), [1.0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error < 1.0, f"mean error still {error:.2f} px after {step} steps"
    score = nme(out[-1][0].detach(), target, "celeba5").mean()
    print(f"overfit: mean error {error:.3f} px after {step} steps, NME {score:.4f}")


def test_bf16_autocast_forward_backward():
    """Under autocast the stage head runs in bf16 (image cast to the embedding dtype); the final coordinates
    stay float32."""
    torch.manual_seed(0)
    model = DeCaFA(DeCaFAConfig(stages=2, **TINY))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 16, 16))
    assert out[0][0].dtype == torch.bfloat16 and out[-1][0].dtype == torch.float32
    sum(z.float().sum() for stage in out for z in stage).backward()
    assert model.stages[0].down0[0][0].weight.grad.abs().sum() > 0


def test_same_output_on_every_available_backend():
    from decafa_fast import ops

    torch.manual_seed(0)
    model = DeCaFA(DeCaFAConfig(stages=2, **TINY)).eval()
    x = torch.rand(2, 1, 16, 16)
    before = ops.get_backend()
    try:
        results = {}
        for name in ("reference", "cpp"):
            if ops.backends()[name] == "available":
                ops.set_backend(name)
                with torch.no_grad():
                    results[name] = model(x)
    finally:
        ops.set_backend(before)
    ref = results["reference"]
    for name, out in results.items():
        for a, b in zip(sum(out, []), sum(ref, [])):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"backend {name}")


def test_last_stage_coordinates_are_float32_under_bf16_autocast():
    """Under bf16 autocast the U-Nets run in bf16, but the last stage's transfer layers and soft-argmax run in
    float32: its z equal a float32 computation from the (bf16) last embedding, which bf16 logits would not."""
    from decafa_fast import ops

    torch.manual_seed(0)
    model = DeCaFA(DeCaFAConfig(stages=2, widths=(4, 8, 8), embedding_channels=4, image_size=32, beta=50.0)).eval()
    captured = {}
    model.stages[-1].register_forward_hook(lambda module, inputs, output: captured.setdefault("embedding", output))
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        bf16_logits = model.transfers[-1](captured["embedding"])  # what the transfer gives under autocast
    embedding = captured["embedding"]
    assert embedding.dtype == torch.bfloat16  # the stage itself did run in bf16
    with torch.no_grad():
        expected = [ops.soft_argmax(t, beta=50.0) for t in model.transfers[-1](embedding.float())]
        from_bf16 = [ops.soft_argmax(t.float(), beta=50.0) for t in bf16_logits]
    for z, want, coarse in zip(out[-1], expected, from_bf16):
        assert z.dtype == torch.float32
        torch.testing.assert_close(z, want, atol=1e-5, rtol=0)
        # bf16 logits move the coordinates by far more than that tolerance
        assert (coarse - want).abs().max() > 1e-3  # 100x the tolerance above


def test_a_model_cast_to_bfloat16_runs_and_gives_float32_coordinates():
    """model.to(bfloat16) without autocast (as the GPU model benchmark runs it): the last stage's transfer
    layers take the embedding in their own dtype, and the coordinates still come out in float32."""
    torch.manual_seed(0)
    model = DeCaFA(DeCaFAConfig(stages=2, widths=(4, 8, 16), embedding_channels=8)).to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32, dtype=torch.bfloat16))
    assert out[-1][0].dtype == torch.float32 and torch.isfinite(out[-1][0]).all()
