"""`profilers.export_onnx`: dense and per-image MoE models export with a dynamic batch and match torch
in ONNX Runtime, whatever batch the export traced."""

import numpy as np
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
