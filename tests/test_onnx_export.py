"""Dense and per-image MoE models export to ONNX with a dynamic batch and match torch in ONNX Runtime."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from search_spaces import build_model

from archs import tiny, tiny_moe


@pytest.mark.parametrize("cfg", [tiny(), tiny_moe(experts=4, top_k=2)], ids=lambda c: c.name)
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch(cfg, tmp_path):
    model = build_model(cfg).eval()
    path = tmp_path / "model.onnx"
    example = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    torch.onnx.export(
        model, (example,), path, input_names=["images"], output_names=["logits"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        (onnx_logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(onnx_logits, model(x).numpy(), atol=1e-4, rtol=0)
