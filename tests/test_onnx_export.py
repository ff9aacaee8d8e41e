"""`profilers.export_onnx`: every model kind exports with a dynamic batch and matches torch in ONNX Runtime,
whatever batch the export traced; the export is quiet and its graph computes no attention scale at run time."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from profilers import export_onnx
from search_spaces import build_model

from archs import tiny, tiny_moe


@pytest.mark.slow
@pytest.mark.parametrize("traced", [1, 3])
@pytest.mark.parametrize("cfg", [tiny(), tiny_moe(experts=4, top_k=2)], ids=lambda c: c.name)
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch(cfg, traced, tmp_path):
    model = build_model(cfg).eval()
    path = export_onnx(model, tmp_path / "model.onnx", batch=traced)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "images" and not isinstance(graph_input.shape[0], int)  # the batch is dynamic
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 7):
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        (onnx_logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(onnx_logits, model(x).numpy(), atol=1e-4, rtol=0)


KINDS = [tiny(), tiny_moe(top_k=1), tiny_moe(top_k=2), tiny_moe(top_k=1, routing="per_token"),
         tiny_moe(top_k=2, routing="per_token", layers=(0, 1, 2))]


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.name)
def test_every_model_kind_exports_to_the_logits_of_torch_at_any_batch(cfg, tmp_path):
    model = build_model(cfg).eval()
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "model.onnx")), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
    for batch in (1, 7, 16):  # traced at 2: no size is a constant of the graph but the image's
        (onnx_logits,) = session.run(None, {"images": images[:batch].numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(onnx_logits, model(images[:batch]).numpy(), atol=1e-5, rtol=0)


def test_export_warns_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(tiny_moe(top_k=2), tmp_path / "model.onnx")
    assert [str(w.message) for w in caught] == []


def test_the_attention_scale_is_a_constant_of_the_exported_graph(tmp_path):
    """Left to scaled_dot_product_attention, the scale is 1/sqrt of a shape read at run time: Shape, Cast and
    Sqrt nodes that ONNX Runtime does not fold, ~5% of a 28 px model's latency."""
    graph = onnx.load(str(export_onnx(tiny(), tmp_path / "model.onnx"))).graph
    assert "Sqrt" not in {node.op_type for node in graph.node}
