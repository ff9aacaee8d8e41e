"""Named architecture presets, shipped as YAML files beside this module."""

from __future__ import annotations

from pathlib import Path

from nas.config import ConfigError, is_file, shown
from search_spaces.config import ArchConfig

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_arch(name_or_path: str | Path) -> ArchConfig:
    """An architecture from a YAML file path, or a preset by bare name (e.g. `vmoe-12x192`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or is_file(path):
        return ArchConfig.load(path)
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not is_file(preset):
        known = ", ".join(preset_names())
        raise ConfigError("config", f"{shown(str(name_or_path))} is neither a file nor a preset ({known})")
    return ArchConfig.load(preset)
