"""The eager PyTorch backend; its agent builds the architecture it is sent as YAML."""

from __future__ import annotations

import contextlib
import copy

import torch
import yaml

from nas.config import safe_yaml_load
from profilers._backends import LocalBackend, Payload, Runnable, check_size, model_form
from profilers._errors import PayloadError, ProfileError
from profilers._export import eval_mode, example_images
from search_spaces import ArchConfig, build_model

MAX_YAML_BYTES = 64 * 1024  # an architecture is a few hundred bytes
DEVICES = ("cpu", "cuda")


class TorchBackend(LocalBackend):
    """Eager PyTorch; provider 'cpu' (default) or 'cuda'."""

    name = "torch"
    content_type = "application/yaml"

    def prepare(self, model, *, batch, threads, provider, cache):
        try:
            device = torch.device(provider or "cpu")
        except RuntimeError:
            device = None
        if device is None or device.type not in DEVICES:
            raise ProfileError(f"torch provider must be a device such as cpu or cuda, got {provider!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ProfileError("provider 'cuda' asked for, but this torch has no CUDA device")
        runner = copy.deepcopy(model).to(device) if device.type != "cpu" else model  # the caller's stays put
        images = example_images(model.cfg, batch).to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def forward():
            runner(images)
            sync()  # CUDA runs asynchronously: time the work, not the launch

        @contextlib.contextmanager
        def setup():
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with eval_mode(runner), torch.inference_mode():
                    yield
            finally:
                torch.set_num_threads(previous)

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return Runnable(forward, name, model_form(model), versions={"torch": torch.__version__}, setup=setup)

    def pack(self, model, *, batch, cache, workdir):
        return Payload(model.cfg.to_yaml().encode(), model_form(model))  # latency does not depend on the weights

    def load(self, body, *, workdir, batch, threads, provider, limits):
        if len(body) > MAX_YAML_BYTES:
            raise PayloadError(f"an architecture YAML is at most {MAX_YAML_BYTES} bytes")
        try:
            cfg = ArchConfig.from_dict(safe_yaml_load(body, "architecture"))
        except (yaml.YAMLError, ValueError) as error:  # ConfigError, bad UTF-8, an int too long to convert
            raise PayloadError(f"not a valid architecture: {error}") from None
        check_size(cfg, batch, limits)
        return self.prepare(build_model(cfg), batch=batch, threads=threads, provider=provider, cache=False)

    @classmethod
    def providers(cls) -> list[str]:
        return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
