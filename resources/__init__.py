"""Dagster resources: where artifacts live, where specs come from, which device computes.

Each resource is configuration plus a ``get()`` returning a plain object the ops use, so ops
never depend on Dagster.  Defaults come from the environment (see definitions.py), so the
same code runs against a local folder in development and another root in deployment.
"""
from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from ops.spec import Spec, load_spec_file
from ops.store import ArtifactStore


class ArtifactStoreResource(ConfigurableResource):
    """Root folder of the artifact store: ``<root>/<experiment>/<asset>/...``."""

    root: str

    def get(self) -> ArtifactStore:
        return ArtifactStore(self.root)


class ExperimentsResource(ConfigurableResource):
    """The folder of experiment specs; partition key ``name`` reads ``<directory>/<name>.yaml``."""

    directory: str

    def spec_path(self, name: str) -> Path:
        return Path(self.directory) / f"{name}.yaml"

    def load(self, name: str) -> Spec:
        return load_spec_file(self.spec_path(name))


class ComputeResource(ConfigurableResource):
    """Compute device: ``auto`` takes CUDA when present, else the CPU; ``threads`` caps CPU threads."""

    device: str = "auto"
    threads: int = 0

    def torch_device(self):
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"compute device {self.device!r} requested but CUDA is not available")
        return dev
