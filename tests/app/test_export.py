"""`decafa-fast export --format onnx`: standard ONNX ops only, onnxruntime agrees with PyTorch."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from decafa_fast import ops, reference
from decafa_fast.app import cli
from decafa_fast.app.export import LastStage, check_onnx, soft_argmax_standard
from decafa_fast.app.model import DeCaFA, DeCaFAConfig
from decafa_fast.app.model.checkpoint import load_model, save_checkpoint

SIZE = 32


@pytest.mark.slow
def test_export_cli_two_stages(tmp_path, capsys):
    """Two stages, so the fused head (mask + F5 fusion) between them is in the graph."""
    torch.manual_seed(0)
    config = DeCaFAConfig(stages=2, image_size=SIZE, embedding_channels=8, widths=(8, 8, 8))
    ckpt = save_checkpoint(tmp_path / "t.pt", DeCaFA(config).eval(), config)
    out = tmp_path / "m.onnx"
    backend = ops.get_backend()
    assert cli.main(["export", "--format", "onnx", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert ops.get_backend() == backend  # the reference backend was only borrowed for the export
    text = capsys.readouterr().out
    diffs = [float(d) for d in re.findall(r"max \|difference\| = (\S+) px", text)]
    assert len(diffs) == 3 and max(diffs) < 1e-3, text
    assert "OK: max coordinate difference" in text

    graph = onnx.load(str(out))
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    assert {"Softmax", "Concat", "Conv"} <= {n.op_type for n in graph.graph.node}
    assert [o.name for o in graph.graph.output] == ["landmarks_wflw98", "landmarks_300w68", "landmarks_celeba5"]

    # dynamic batch: a batch size other than the exported one, compared with PyTorch here as well
    model, _ = load_model(ckpt)
    images = torch.rand(5, 1, SIZE, SIZE)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})
    with torch.inference_mode():
        expected = LastStage(model)(images)
    assert [g.shape for g in got] == [(5, 98, 2), (5, 68, 2), (5, 5, 2)]
    for g, e in zip(got, expected):
        assert np.abs(g - e.numpy()).max() < 1e-3


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 2, 1, 6), (2, 2, 5, 1), (2, 3, 7, 9)])
def test_standard_soft_argmax_equals_reference(shape, normalized):
    t = torch.randn(*shape, dtype=torch.float64) * 3
    torch.testing.assert_close(soft_argmax_standard(t, 0.7, normalized), reference.soft_argmax(t, 0.7, normalized))


def test_standard_soft_argmax_is_accurate_in_float32():
    """A flat 128 x 128 map (an untrained model's) is the hard case for a float32 soft-argmax."""
    t = torch.randn(2, 98, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    exact = reference.soft_argmax(t)
    assert (soft_argmax_standard(t.float()).double() - exact).abs().max() < 1e-4


def test_check_onnx_rejects_custom_ops(tmp_path):
    node = helper.make_node("DecafaHead", ["images"], ["landmarks_wflw98"], domain="decafa")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("landmarks_wflw98", TensorProto.FLOAT, [1, 98, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("decafa", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    torch_model = DeCaFA(DeCaFAConfig(stages=1, image_size=4, embedding_channels=2, widths=(2, 2, 2)))
    with pytest.raises(RuntimeError, match="decafa::DecafaHead"):
        check_onnx(torch_model, path, torch.rand(1, 1, 4, 4))
