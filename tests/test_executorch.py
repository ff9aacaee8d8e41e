"""ExecuTorch: the form XNNPACK takes computes the model; `.pte` programs lower to XNNPACK (topk, one
index_select and its index's reshape left portable), run in executorch.runtime like torch, profile locally
and on an agent, and come out of `vmoe-nas export`. Lowering takes ~20-90 s on a busy machine: the tests
lower two tiny models (a dense one, shared through the artifact cache, and the smoke study's MoE)."""

import asyncio
import importlib.util
import json
import re

import httpx
import pytest
import torch
from tiny_study import STUDY, tiny_study_results

import profilers
from nas.cli import main
from profilers import Delegation, LoweringError, XnnpackForm, cached_executorch, check_kernels, lower
from profilers.server import AgentSettings, create_app, measure
from search_spaces import ArchConfig, build_model

from archs import tiny, tiny_moe

needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="executorch is not installed: pip install 'vmoe-nas[executorch]'")
FAST = {"warmup": 1, "min_runs": 3, "min_time_s": 0.0}
OPTIONS = {"batch": 1, "threads": 1, "provider": None, **FAST}
PTE = {"Content-Type": "application/x-executorch"}


@pytest.mark.parametrize("cfg", [tiny(), tiny_moe(top_k=1), tiny_moe(top_k=2, experts=3, depth=4, layers=(1, 3)),
                                 tiny_moe(top_k=2, routing="per_token")], ids=["dense", "k1", "k2", "per_token"])
def test_the_xnnpack_form_computes_the_model(cfg):
    model = build_model(cfg).eval()
    for parameter in model.parameters():  # no zero class token, unit norm weights or zero biases to hide a slip
        parameter.data.normal_(0, 0.3)
    images = torch.randn(64, 1, 8, 8) * torch.logspace(-1, 1, 64)[:, None, None, None]  # routed to many experts
    with torch.no_grad():
        torch.testing.assert_close(XnnpackForm(model)(images), model(images), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "executorch-cache"


@pytest.fixture
def dense_pte(cache, monkeypatch) -> bytes:
    """The cached batch-1 program of tiny(): lowered by the first test that asks, read by the others."""
    monkeypatch.setenv(profilers.CACHE_ENV, str(cache))
    return cached_executorch(tiny(), 1).read_bytes()


@needs_executorch
@pytest.mark.slow
def test_profile_with_the_executorch_backend(dense_pte, tmp_path, capsys):
    arch = tiny().save(tmp_path / "arch.yaml")  # the fixture's architecture: its program is cached
    assert main(["profile", str(arch), "--backend", "executorch", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["latency_ms"]["median"] > 0 and result["provider"] == "xnnpack"
    assert result["export_form"] == "dense (xnnpack)" and result["artifact"].endswith(".pte")
    assert result["device"]["versions"]["executorch"]
    assert main(["profile", str(arch), "--backend", "executorch", "--provider", "cuda"]) == 2
    assert "provider xnnpack" in capsys.readouterr().err


def post(app, body: bytes, params: dict, headers: dict = PTE) -> httpx.Response:
    async def send():
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            return await client.post("/profile", content=body, headers=headers, params=params)

    return asyncio.run(send())


@needs_executorch
@pytest.mark.slow
def test_an_agent_measures_a_pte_in_a_child_within_the_limits(dense_pte):
    app = create_app(AgentSettings(backend="executorch", max_upload_bytes=len(dense_pte) + 10, timeout_s=120))
    response = post(app, dense_pte, FAST)
    assert response.status_code == 200, response.text
    assert response.json()["latency_ms"]["runs"] >= FAST["min_runs"] and response.json()["provider"] == "xnnpack"
    response = post(app, dense_pte + b"\0" * 20, FAST)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    response = post(app, dense_pte, FAST, headers={"Content-Type": "application/onnx"})
    assert response.status_code == 415 and "application/x-executorch" in response.json()["error"]
    hasty = create_app(AgentSettings(backend="executorch", timeout_s=3))
    response = post(hasty, dense_pte, {"warmup": 0, "min_runs": 1, "min_time_s": 60})
    assert response.status_code == 504 and "3 s" in response.json()["error"]


@pytest.mark.slow
@needs_executorch
@pytest.mark.parametrize("damage, options, message", [
    (lambda pte: b"\x08\x07garbage" * 100, {}, "not an ExecuTorch program"),
    (lambda pte: pte[: len(pte) // 2], {}, "ExecuTorch cannot load the program"),
    (lambda pte: pte, {"batch": 4}, "lowered for batch 1 (N, C, H, W), asked for batch 4"),
    (lambda pte: pte, {"provider": "cuda"}, "provider xnnpack"),
], ids=["garbage", "truncated", "other-batch", "provider"])
def test_an_agent_refuses_a_bad_pte_naming_why(dense_pte, damage, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):  # PayloadError, ProfileError: 400, 422
        measure(AgentSettings(backend="executorch"), damage(dense_pte), {**OPTIONS, **options})


@needs_executorch
@pytest.mark.slow
def test_a_model_that_fails_to_lower_is_one_error_naming_the_op(monkeypatch):
    from executorch.runtime import Runtime

    class Inverse(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.inv(x)

    with pytest.raises(LoweringError, match=r"inverse: lowering to XNNPACK failed at aten.linalg_inv"):
        lower(Inverse(), torch.eye(3)[None], name="inverse")
    registry = Runtime.get().operator_registry
    kept = {name for name in registry.operator_names if not name.startswith("aten::topk")}
    monkeypatch.setattr(type(registry), "operator_names", property(lambda self: kept))
    with pytest.raises(LoweringError, match=r"m: no ExecuTorch kernel for aten::topk"):
        check_kernels(Delegation(1, 9, {"aten::index_select": 1, "aten::topk": 1}), "m")


@needs_executorch
@pytest.mark.slow
def test_export_of_the_smoke_moe_writes_a_pte_that_runs_like_torch(tmp_path_factory, tmp_path, capsys):
    from executorch.runtime import Runtime

    results = tiny_study_results(tmp_path_factory)
    out = tmp_path / "moe"
    assert main(["export", "--study", STUDY, "--results-dir", str(results), "--trial", "1", "--out", str(out),
                 "--no-coreml"]) == 0
    assert "model.pte" in capsys.readouterr().out
    card = (out / "model_card.md").read_text()
    cfg = ArchConfig.load(out / "arch.yaml")
    portable = "left on portable kernels: aten::index_select x1, aten::topk x1, aten::view_copy x1"
    assert "2 XNNPACK delegate call(s)" in card and portable in card
    assert f"of {cfg.moe.num_experts} experts" in card
    torch.manual_seed(0)  # the recipe's seed: the exported weights are this fresh model's
    model = build_model(cfg).eval()
    method = Runtime.get().load_program(out / "model.pte").load_method("forward")
    for image in torch.randn(6, 1, 16, 16) * torch.tensor([0.1, 0.3, 1, 3, 10, 30])[:, None, None, None]:
        torch.testing.assert_close(method.execute([image[None]])[0], model(image[None]).detach(), atol=1e-4, rtol=0)
