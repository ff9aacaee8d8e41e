"""What an app needs beside the graph: the routing file of a per-image MoE's Core ML programs says which tail
to run and how, and every exported file carries the input normalisation, class names and routing facts."""

import json

import onnx
import pytest
import torch
from test_profilers_coreml import IMAGES, sharp_router

from nas.deploy import ModelInfo, coreml_routing
from nas.formats import export_checked_onnx, write_coreml
from profilers import Tail, Trunk, tail_name
from search_spaces import build_model

from archs import tiny, tiny_moe

INFO = dict(mean=(0.25,), std=(0.5,), class_names=tuple("abcde"))


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [1, 2])
def test_the_routing_file_names_the_tail_to_run_and_its_inputs(top_k):
    cfg = tiny_moe(experts=3, top_k=top_k)
    routing = json.loads(json.dumps(coreml_routing(cfg, batch=1)))  # as an app reads it
    model = sharp_router(cfg)
    with torch.no_grad():
        expected = model(IMAGES)
        for image, want in zip(IMAGES.split(1), expected.split(1)):  # the trunk takes one image per call
            features, experts, gates = Trunk(model)(image)
            order = experts[0].argsort()
            subset = tuple(experts[0, order].tolist())
            assert routing["tails"]["-".join(map(str, subset))] == f"{tail_name(subset)}.mlpackage"
            tail = Tail(model, subset)
            inputs = {"features": features, "gates": gates[:, order]}
            logits = tail(*(inputs[name] for name in routing["tail_inputs"]))
            torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    assert len(routing["tails"]) == 3 and routing["trunk"]["outputs"] == ["features", "experts", "gates"]


@pytest.mark.slow
def test_onnx_metadata_holds_the_input_and_routing_facts(tmp_path):
    cfg = tiny_moe(experts=4, top_k=2, routing="per_token")
    info = ModelInfo(cfg, **INFO)
    export_checked_onnx(build_model(cfg), tmp_path / "model.onnx", info.metadata())
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(props["mean"]) == [0.25] and json.loads(props["std"]) == [0.5]
    assert json.loads(props["class_names"]) == list("abcde") and props["image_size"] == "8"
    assert (props["routing"], props["num_experts"], props["top_k"], props["moe_blocks"]) == ("per_token", "4", "2",
                                                                                              "[1, 2]")
    dense = ModelInfo(tiny(), **INFO).to_dict()
    assert dense["routing"] == "dense" and "num_experts" not in dense


@pytest.mark.slow
def test_core_ml_programs_carry_the_facts_and_the_routing_file(tmp_path):
    ct = pytest.importorskip("coremltools")
    cfg = tiny_moe(experts=3, top_k=2)
    info = ModelInfo(cfg, **INFO)
    note = write_coreml(build_model(cfg), tmp_path, info)
    assert "coreml/routing.json" in note and "not written" not in note
    routing = json.loads((tmp_path / "coreml" / "routing.json").read_text())
    assert routing == coreml_routing(cfg, batch=1)
    assert {p.name for p in (tmp_path / "coreml").iterdir()} == {"routing.json", routing["trunk"]["file"],
                                                                 *routing["tails"].values()}
    for name in (routing["trunk"]["file"], routing["tails"]["0-2"]):
        described = ct.utils.load_spec(str(tmp_path / "coreml" / name)).description.metadata
        assert {k: described.userDefined[k] for k in info.metadata()} == info.metadata()
        assert "mean [0.25] and std [0.5]" in described.shortDescription
