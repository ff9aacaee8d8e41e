"""Core ML: the gather-free export forms compute the model exactly, convert without gathers, and the
backend measures on macOS only, saying so elsewhere."""

import sys

import pytest
import torch

import profilers
import profilers._coreml  # private on purpose: the coremltools conversion is replaced where export calls it
from profilers import ProfileError, Tail, Trunk, export_coreml, format_profile, masked_per_token, profile
from search_spaces import build_model
from search_spaces.model import PerTokenExperts

from archs import tiny_moe

IMAGES = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def sharp_router(cfg):
    """A router that ignores what all class tokens share, and is sharp: random images reach every expert."""
    model = build_model(cfg).eval()
    with torch.no_grad():
        mean = Trunk(model)(IMAGES)[0][:, 0].mean(0)  # the class token the router reads, on average
        weight = model.router.linear.weight
        weight -= torch.outer(weight @ mean, mean) / mean.dot(mean)
        weight *= 100
    return model


@pytest.mark.parametrize("top_k", [1, 2])
def test_trunk_then_the_tail_of_the_chosen_experts_is_the_model(top_k):
    model = sharp_router(tiny_moe(experts=3, top_k=top_k))
    with torch.no_grad():
        features, experts, gates = Trunk(model)(IMAGES)
        experts, order = experts.sort(-1)  # tails are named by sorted experts, gates in the same order
        gates = gates.gather(-1, order)
        subsets = {tuple(e.tolist()) for e in experts}
        assert len(subsets) == 3  # every tail is exercised: C(3, 1) = C(3, 2) = 3
        expected = model(IMAGES)
        for subset in subsets:
            tail = Tail(model, subset)
            rows = [i for i, e in enumerate(experts.tolist()) if tuple(e) == subset]
            logits = tail(features[rows]) if top_k == 1 else tail(features[rows], gates[rows])
            torch.testing.assert_close(logits, expected[rows], rtol=0, atol=1e-5)


def test_masked_per_token_form_is_the_model_and_leaves_it_alone():
    model = build_model(tiny_moe(experts=4, top_k=2, routing="per_token")).eval()
    with torch.no_grad():
        torch.testing.assert_close(masked_per_token(model)(IMAGES), model(IMAGES), rtol=0, atol=1e-5)
    assert isinstance(model.blocks[1].mlp, PerTokenExperts)


def ops(path) -> set[str]:
    import coremltools as ct

    function = ct.utils.load_spec(str(path)).mlProgram.functions["main"]
    return {op.type for block in function.block_specializations.values() for op in block.operations}


@pytest.mark.slow
def test_coreml_profile_exports_trunk_and_one_tail_without_gathers(tmp_path, monkeypatch):
    monkeypatch.setenv(profilers.CACHE_ENV, str(tmp_path))
    profiled = profile(tiny_moe(experts=3, top_k=2), backend="coreml", warmup=1, min_runs=3, min_time_s=0)
    result = profiled.to_dict()
    if sys.platform == "darwin":
        assert result["export_form"] == "per_image:trunk+tails (measured: trunk then tail-0-1)"
        assert result["latency_ms"]["runs"] >= 3
    else:  # nothing measured: no "(measured: ...)" beside "latency unavailable"
        assert result["export_form"] == "per_image:trunk+tails" and "measured:" not in format_profile(profiled)
        assert result["latency_ms"] is None and "need macOS" in result["latency_note"]
    programs = sorted(p.name for p in tmp_path.glob("coreml/*/*"))
    assert programs == ["tail-0-1.mlpackage", "trunk.mlpackage"]  # every tail costs the same: one is measured
    for path in tmp_path.glob("coreml/*/*.mlpackage"):
        assert not any("gather" in op or "scatter" in op for op in ops(path)), path.name


def test_all_tails_are_one_per_set_of_k_experts(tmp_path, monkeypatch):
    monkeypatch.setattr(profilers._coreml, "_convert", lambda module, inputs, outputs, path, precision, **about: path)
    exported = export_coreml(tiny_moe(experts=4, top_k=2), tmp_path)
    assert len(exported.programs) == 1 + 6 and exported.pipeline == ("trunk", "tail-0-1")  # C(4, 2) tails
    assert {"tail-0-1", "tail-2-3"} <= exported.programs.keys()


@pytest.mark.slow
def test_per_token_exports_in_the_masked_form(tmp_path):
    exported = export_coreml(build_model(tiny_moe(experts=4, routing="per_token")), tmp_path, precision="fp32")
    assert exported.form == "per_token:all_experts_masked" and exported.pipeline == ("model",)
    assert not any("gather" in op or "scatter" in op for op in ops(exported.programs["model"]))


def test_unknown_precision_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="precision"):
        export_coreml(tiny_moe(), tmp_path, precision="int3")
