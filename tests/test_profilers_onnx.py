"""ONNX export keeps every expert and matches torch on images routed to each; profiles and the artifact cache."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import profilers._export  # private on purpose: the cache's exporter is replaced where the cache calls it
from profilers import (
    ProfileError,
    analytic_flops,
    build_once,
    cache_dir,
    export_onnx,
    onnx_cache_path,
    onnxruntime_latency,
    profile,
)
from search_spaces import build_model, count_params

from archs import tiny, tiny_moe

FAST = {"warmup": 1, "min_runs": 3, "min_time_s": 0}
FORMS = {"per_image": "gather", "per_token": "grouped"}
IMAGES = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(profilers.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield cache_dir()


def routers(model):
    experts = model.cfg.moe.num_experts
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == experts]


def router_io(model, images) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, logits) of each router when the model runs on `images`."""
    seen = []
    hooks = [r.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for r in routers(model)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return seen


def routed_everywhere(cfg, images):
    """A model whose routers ignore what all their inputs share and are sharp, so `images` reach every expert."""
    model = build_model(cfg).eval()
    with torch.no_grad():
        for router, (inputs, _) in zip(routers(model), router_io(model, images)):
            mean = inputs.reshape(-1, cfg.width).mean(0)
            router.weight -= torch.outer(router.weight @ mean, mean) / mean.dot(mean)
            router.weight *= 100
    return model


def chosen_experts(model, images) -> list[set[int]]:
    """The experts each router picked for `images`."""
    return [set(logits.topk(model.cfg.moe.top_k).indices.flatten().tolist()) for _, logits in router_io(model, images)]


@pytest.fixture(scope="module", params=["per_image", "per_token"])
def exported(request, cache):
    """A MoE model routed to every expert by IMAGES, exported into the cache as its config's artifact."""
    per_image = request.param == "per_image"  # one per-token MoE block: its export unrolls a loop over experts
    cfg = tiny_moe(experts=4, top_k=2 if per_image else 1, layers=(1, 2) if per_image else (2,), routing=request.param)
    model = routed_everywhere(cfg, IMAGES).train()
    path = build_once(onnx_cache_path(cfg), lambda p: export_onnx(model, p))
    return model, path, model.training


@pytest.mark.slow
def test_export_gives_a_training_model_back_in_training_mode(exported):
    assert exported[2]


def holds(initializers, stacked: np.ndarray) -> bool:
    """Every expert's slice of `stacked` is in the file, stacked or one initializer per expert."""
    def found(value):
        return any(a.size == value.size and np.array_equal(a.ravel(), value.ravel()) for a in initializers)
    return found(stacked) or all(found(expert) for expert in stacked)


@pytest.mark.slow
def test_exported_moe_holds_all_experts(exported):
    model, path, _ = exported
    initializers = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    for name, param in model.named_parameters():
        if name.split(".")[-1].startswith(("fc1_", "fc2_")):  # the stacked (E, ...) expert tensors
            assert holds(initializers, param.detach().numpy()), name


@pytest.mark.slow
def test_exported_moe_matches_torch_on_images_routed_to_every_expert(exported):
    model, path, _ = exported
    model.eval()
    assert all(chosen == set(range(4)) for chosen in chosen_experts(model, IMAGES))
    with torch.no_grad():
        expected = model(IMAGES).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (IMAGES, IMAGES[:1]):  # the batch dimension is dynamic
        (logits,) = session.run(None, {"images": batch.numpy()})
        np.testing.assert_allclose(logits, expected[: len(batch)], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnxruntime_latency_reads_the_input_shape_from_the_file(exported):
    measured = onnxruntime_latency(exported[1], batch=3, threads=1, **FAST)
    assert (measured["batch"], measured["threads"], measured["provider"]) == (3, 1, "CPUExecutionProvider")
    assert measured["latency_ms"]["runs"] >= 3 and measured["latency_ms"]["median"] > 0
    assert measured["versions"]["onnxruntime"] == ort.__version__


@pytest.mark.slow
def test_unknown_provider_names_the_available_ones(exported):
    with pytest.raises(ProfileError, match="CPUExecutionProvider"):
        onnxruntime_latency(exported[1], provider="NoSuchExecutionProvider")


def test_profile_is_json_and_reuses_the_cached_export(monkeypatch, exported):
    cfg, path = exported[0].cfg, exported[1]
    monkeypatch.setattr(profilers._export, "export_onnx", lambda *a, **k: pytest.fail("exported twice"))
    second = profile(cfg, threads=2, batch=4, **FAST).to_dict()
    assert second["artifact"] == str(path)
    assert json.loads(json.dumps(second))["latency_ms"].keys() == {"median", "p5", "p10", "p90", "mean", "std", "cv",
                                                                   "runs"}
    assert (second["backend"], second["provider"], second["threads"], second["batch"]) == (
        "onnxruntime", "CPUExecutionProvider", 2, 4)
    assert second["export_form"] == f"{cfg.moe.routing}:{FORMS[cfg.moe.routing]}" and second["latency_ms"]["runs"] >= 3
    assert {"cpu", "cores", "os", "hostname"} <= second["device"].keys()
    assert second["device"]["versions"]["onnxruntime"] == ort.__version__


def test_cheap_profile_counts_without_exporting_or_measuring(monkeypatch):
    monkeypatch.setattr(profilers._export, "export_onnx", lambda *a, **k: pytest.fail("exported"))
    cfg = tiny_moe(experts=4, top_k=2, routing="per_token")
    result = profile(cfg, measure=False).to_dict()
    total, active = count_params(build_model(cfg))
    assert (result["params_total"], result["params_active"]) == (total, active)
    assert result["flops"] == analytic_flops(cfg) == sum(result["flops_by_module"].values())
    assert (result["size_bytes_fp32"], result["size_bytes_fp16"]) == (4 * total, 2 * total)
    assert (result["size_bytes_fp32_active"], result["size_bytes_fp16_active"]) == (4 * active, 2 * active)
    assert result["latency_ms"] is None and result["uncounted_ops"] == []
    assert result["config_hash"] == cfg.config_hash() and result["export_form"] == "per_token:grouped"


def test_torch_backend_measures_a_given_model_and_restores_threads():
    model = build_model(tiny_moe(routing="per_token"))
    threads = torch.get_num_threads()
    result = profile(model, backend="torch", threads=1, batch=2, **FAST).to_dict()
    assert result["latency_ms"]["runs"] >= 3 and result["provider"] == "cpu" and result["artifact"] is None
    assert torch.get_num_threads() == threads and model.training  # the caller's model and settings, untouched


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_profile_with_an_anchor_times_both_and_gives_their_ratio(backend):
    anchor_cfg = tiny()
    result = profile(tiny_moe(), backend=backend, anchor=anchor_cfg, **FAST).to_dict()
    anchor = result["anchor"]
    assert (anchor["name"], anchor["config_hash"]) == (anchor_cfg.name, anchor_cfg.config_hash())
    assert anchor["latency_ms"]["runs"] >= FAST["min_runs"] and result["latency_ms"]["runs"] >= FAST["min_runs"]
    assert anchor["ratio"] == result["latency_ms"]["median"] / anchor["latency_ms"]["median"]
    assert "anchor" not in profile(tiny_moe(), backend=backend, **FAST).to_dict()


def test_bad_backend_and_provider_are_profile_errors():
    with pytest.raises(ProfileError, match="unknown backend"):
        profile(tiny(), backend="tensorrt", measure=False)
    if not torch.cuda.is_available():
        with pytest.raises(ProfileError, match="CUDA"):
            profile(tiny(), backend="torch", provider="cuda", **FAST)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(profilers.CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv(profilers.CACHE_ENV)
    assert cache_dir() == Path("results/cache")


def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path):
    def fail(path):
        path.write_text("half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "onnx" / "x.onnx", fail)
    assert list((tmp_path / "onnx").iterdir()) == []
    assert build_once(tmp_path / "onnx" / "x.onnx", lambda p: p.write_text("ok")).read_text() == "ok"
