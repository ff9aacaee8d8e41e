"""`vmoe-nas profile`: a readable table, or one JSON object; a bad option is one clear line."""

import json

import pytest

import profilers
from nas.cli import main

from archs import tiny_moe


@pytest.fixture
def arch(tmp_path, monkeypatch):
    monkeypatch.setenv(profilers.CACHE_ENV, str(tmp_path / "cache"))
    return str(tiny_moe(experts=4, top_k=2).save(tmp_path / "arch.yaml"))


def test_profile_json_is_one_object_with_the_cost_fields(arch, capsys):
    assert main(["profile", arch, "--backend", "torch", "--batch", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"params_total", "params_active", "flops", "size_bytes_fp32", "device", "export_form"} <= result.keys()
    assert {"median", "p10", "p90", "cv", "runs"} <= result["latency_ms"].keys()
    assert (result["backend"], result["threads"], result["batch"]) == ("torch", 1, 2)


def test_profile_table(arch, capsys):
    assert main(["profile", arch, "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "active per image" in out and "experts" in out and "latency     median" in out


def test_profile_against_an_anchor_prints_the_ratio(arch, capsys):
    assert main(["profile", arch, "--backend", "torch", "--anchor", "fmnist-vit-4x32"]) == 0
    assert "anchor      vit-4x32h2-p4-28: median" in capsys.readouterr().out
    assert main(["profile", arch, "--anchor", "no-such-arch"]) == 2
    assert "no-such-arch" in capsys.readouterr().err


def test_missing_provider_is_one_line_error(arch, capsys):
    assert main(["profile", arch, "--provider", "NoSuchExecutionProvider"]) == 2
    err = capsys.readouterr().err
    assert "CPUExecutionProvider" in err and "Traceback" not in err


def test_table_says_why_latency_is_missing():
    table = profilers.format_profile(profilers.profile(tiny_moe(), measure=False))
    assert "latency     unavailable: not measured (measure=False)" in table
    assert "router" in table and "uncounted" not in table
