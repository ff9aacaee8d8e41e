"""The Core ML backend: ML programs in the gather-free forms of `profilers._coreml`, measured on macOS.
Its agent payload is a zip of the programs one prediction runs and the architecture they came from."""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from profilers._backends import LocalBackend, Payload, Runnable, check_size, proto_messages
from profilers._coreml import CoreMLExport, check_package, coreml_cache_dir, coreml_form, export_coreml
from profilers._errors import PayloadError, ProfileError
from profilers._export import example_images, package_version
from search_spaces import ArchConfig

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")  # coremltools.ComputeUnit
PIPELINE_FILE = "pipeline.json"  # in a Core ML payload: the programs to run in order, and the architecture
PROGRAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_DEPTH = 32  # folders in an entry's path: a Core ML package nests 4; 1,500 made a RecursionError


def compute_units(provider: str | None) -> str:
    """The Core ML compute units a provider names (default: all)."""
    units = (provider or "all").upper()
    if units not in COMPUTE_UNITS:
        raise ProfileError(f"Core ML provider must be a compute unit ({', '.join(COMPUTE_UNITS).lower()}), "
                           f"got {provider!r}")
    return units


def macos_note() -> str | None:
    """Why Core ML cannot predict on this machine; None on macOS."""
    if sys.platform == "darwin":
        return None
    return f"Core ML predictions need macOS, this is {sys.platform}: exported only, latency not measured"


class CoreMLBackend(LocalBackend):
    """Core ML ML programs; provider = compute units (all, cpu_only, cpu_and_gpu, cpu_and_ne). Measures
    on macOS only; elsewhere exports and says so. Core ML has no thread setting: `threads` is ignored."""

    name = "coreml"
    content_type = "application/zip"

    def __init__(self, *, precision: str = "fp16", all_tails: bool = False, **protocol):
        super().__init__(**protocol)
        self.precision, self.all_tails = precision, all_tails

    def form(self, model):
        return coreml_form(model.cfg)

    def prepare(self, model, *, batch, threads, provider, cache):
        units = compute_units(provider)
        # Uncached (a given model), the export goes to a folder that is kept: the result names it.
        out_dir = coreml_cache_dir(model.cfg, self.precision, batch) if cache else Path(
            tempfile.mkdtemp(prefix="vmoe-coreml-"))
        exported = export_coreml(model, out_dir, batch=batch, precision=self.precision, all_tails=self.all_tails)
        return self.runnable(exported, model.cfg, batch=batch, units=units, artifact=str(out_dir))

    def runnable(self, exported: CoreMLExport, cfg: ArchConfig, *, batch: int, units: str,
                 artifact: str | None = None) -> Runnable:
        versions = {"coremltools": package_version("coremltools")}
        note = macos_note()
        call = None if note else predict_fn(exported, cfg, batch, units)
        # Off macOS nothing is measured: the form, without the programs a measurement would run.
        return Runnable(call, units, exported.form if note else exported.measured_form, artifact, note=note,
                        versions=versions)

    def pack(self, model, *, batch, cache, workdir):
        out_dir = coreml_cache_dir(model.cfg, self.precision, batch) if cache else workdir / "coreml"
        exported = export_coreml(model, out_dir, batch=batch, precision=self.precision, all_tails=False)
        return Payload(coreml_zip(exported, model.cfg.to_dict()), exported.measured_form,
                       str(out_dir) if cache else None)

    def load(self, body, *, workdir, batch, threads, provider, limits):
        import coremltools as ct

        units = compute_units(provider)
        exported, cfg = unpack_coreml(body, workdir, limits.unzip_ratio * limits.max_bytes)
        check_size(cfg, batch, limits)
        for path in exported.programs.values():
            check_package(path)
            try:  # parse the spec without compiling: a malformed package fails here, on any OS
                spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
            except Exception as error:
                message = str(error).replace(str(workdir), "").replace(str(workdir.resolve()), "")
                raise PayloadError(f"{path.name} is not a valid Core ML package: {message[:300]}") from None
            check_weight_files(spec, path)
        return self.runnable(exported, cfg, batch=batch, units=units)

    @classmethod
    def providers(cls) -> list[str]:
        return [unit.lower() for unit in COMPUTE_UNITS]


def predict_fn(exported: CoreMLExport, cfg: ArchConfig, batch: int, units: str):
    """One prediction: each program of the pipeline in turn, fed by the outputs before it."""
    import coremltools as ct

    programs = [ct.models.MLModel(str(exported.programs[name]), compute_units=ct.ComputeUnit[units])
                for name in exported.pipeline]
    names = [[i.name for i in program.get_spec().description.input] for program in programs]
    images = example_images(cfg, batch).numpy()

    def predict():
        values = {"images": images}
        for program, inputs in zip(programs, names):
            values.update(program.predict({name: values[name] for name in inputs}))

    return predict


def check_weight_files(spec, package: Path) -> None:
    """The weight files an ML program names (`@model_path/...`, relative to the model spec) are in the package."""
    root, model_dir = package.resolve(), package / "Data" / "com.apple.CoreML"
    for blob in proto_messages(spec, "BlobFileValue"):
        name = blob.fileName
        target = (model_dir / name.removeprefix("@model_path/")).resolve()
        if not (name.startswith("@model_path/") and target.is_relative_to(root) and target.is_file()):
            raise PayloadError(f"{package.name} names the weight file {name[:100]!r}, which is not in the package")


def coreml_zip(exported: CoreMLExport, arch: dict) -> bytes:
    """The Core ML payload: the programs of `exported.pipeline` (`NAME.mlpackage/...`) and PIPELINE_FILE."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(PIPELINE_FILE, json.dumps({"form": exported.form, "pipeline": list(exported.pipeline),
                                                    "arch": arch}))
        for name in exported.pipeline:
            root = Path(exported.programs[name])
            for file in sorted(p for p in root.rglob("*") if p.is_file()):
                archive.write(file, f"{name}.mlpackage/{file.relative_to(root).as_posix()}")
    return buffer.getvalue()


def unpack_coreml(body: bytes, out_dir: Path, max_bytes: int) -> tuple[CoreMLExport, ArchConfig]:
    """Unpack a Core ML payload (see `coreml_zip`) into `out_dir`: only PIPELINE_FILE and
    `NAME.mlpackage/...` regular files, no absolute or parent paths, no name both a file and a folder,
    at most `max_bytes` unpacked."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except zipfile.BadZipFile:
        raise PayloadError("not a zip file (a coreml agent takes a zipped Core ML pipeline)") from None
    entries = archive.infolist()
    if len(entries) > MAX_ZIP_ENTRIES or sum(entry.file_size for entry in entries) > max_bytes:
        raise PayloadError(f"the zip unpacks to more than {MAX_ZIP_ENTRIES} files or {max_bytes} bytes")
    _check_entries(entries)
    try:
        spec = json.loads(archive.read(PIPELINE_FILE))
        names, arch = list(spec["pipeline"]), ArchConfig.from_dict(spec["arch"])
    except (KeyError, TypeError, ValueError) as error:  # ConfigError is a ValueError
        raise PayloadError(f"{PIPELINE_FILE} is missing or malformed: {str(error)[:300]}") from None
    if not names or not all(isinstance(n, str) and PROGRAM_NAME.fullmatch(n) for n in names):
        raise PayloadError(f"{PIPELINE_FILE}: pipeline must list program names, got {str(names)[:200]}")
    try:
        for entry in entries:  # member sizes are enforced while reading: a lying header fails its CRC
            if not entry.is_dir():
                target = out_dir / entry.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(entry))
    except zipfile.BadZipFile as error:
        raise PayloadError(f"corrupt zip: {error}") from None
    programs = {name: out_dir / f"{name}.mlpackage" for name in names}
    missing = [name for name, path in programs.items() if not (path / "Manifest.json").is_file()]
    if missing:
        raise PayloadError(f"no {missing[0]}.mlpackage/Manifest.json in the zip")
    return CoreMLExport(str(spec.get("form", "")), programs, tuple(names)), arch


def _check_entries(entries: list[zipfile.ZipInfo]) -> None:
    files, folders = set(), set()
    for entry in entries:
        path = PurePosixPath(entry.filename)
        if len(path.parts) > MAX_ZIP_DEPTH:
            raise PayloadError(f"zip entry {entry.filename[:100]!r}... is nested {len(path.parts)} deep, more than "
                               f"{MAX_ZIP_DEPTH}")
        is_link = (entry.external_attr >> 16) & 0o170000 == 0o120000
        top = path.parts[0] if path.parts else ""
        if (path.is_absolute() or "\\" in entry.filename or ".." in path.parts or ":" in top or is_link
                or not (entry.filename == PIPELINE_FILE or top.endswith(".mlpackage"))):
            raise PayloadError(f"zip entry {entry.filename[:100]!r} is not allowed "
                               f"(only {PIPELINE_FILE} and NAME.mlpackage/...)")
        (folders if entry.is_dir() else files).add(path)
        folders.update(path.parents)
    both = files & folders
    if both:
        raise PayloadError(f"zip entry {str(min(both))[:100]!r} is both a file and a folder")
