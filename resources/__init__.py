"""Dagster resources: where artifacts live, where specs come from, which device computes.

Each resource is configuration plus a ``get()`` returning a plain object the ops use, so ops
never depend on Dagster.  Defaults come from the environment (see definitions.py), so the
same code runs against a local folder in development and another root in deployment.
"""
from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from ops.spec import Spec, load_spec_file
from ops.store import ArtifactStore


class ArtifactStoreResource(ConfigurableResource):
    """Root folder of the artifact store: ``<root>/<experiment>/<asset>/...``.

    With ``url`` (an fsspec URL, from ``PROVENANCE_STORE_URL``) the root is this machine's working
    copy of a shared store (ops/mirror.py): a step pulls its experiment's changed files before it
    runs and pushes what it wrote afterwards, so steps may run on different machines."""

    root: str
    url: str = ""
    _mirror = PrivateAttr(default=None)
    _experiment = PrivateAttr(default=None)
    _before = PrivateAttr(default=None)

    def get(self) -> ArtifactStore:
        return ArtifactStore(self.root)

    def mirror(self):
        from ops.mirror import StoreMirror

        if self.url and self._mirror is None:
            self._mirror = StoreMirror(self.url, self.root)
        return self._mirror

    def _prefixes(self, name: str) -> tuple[str, str]:
        return f"{name}/", f".pins/{name}/"

    def setup_for_execution(self, context: InitResourceContext) -> None:
        run = context.run
        name = run.tags.get("dagster/partition") if run is not None else None
        if not (self.url and name):
            return
        mirror = self.mirror()
        pulled = sum(mirror.pull(p) for p in self._prefixes(name))
        self._experiment = name
        self._before = {p: mirror.snapshot(p) for p in self._prefixes(name)}
        if context.log is not None:
            context.log.info(f"store: pulled {pulled} changed files of {name} from {self.url}")

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._experiment is None:
            return
        pushed = sum(self.mirror().push(p, self._before[p]) for p in self._prefixes(self._experiment))
        if context.log is not None:
            context.log.info(f"store: pushed {pushed} files of {self._experiment} to {self.url}")
        self._experiment = None

    def pin(self, spec: Spec) -> str:
        """Pin ``spec`` for a run (ops.spec.pin_spec) where every machine of the run finds it."""
        from ops.spec import pin_spec

        digest = pin_spec(spec, self.root)
        if self.url:
            self.mirror().push(f".pins/{spec.name}/")
        return digest


class ExperimentsResource(ConfigurableResource):
    """The folder of experiment specs; partition key ``name`` reads ``<directory>/<name>.yaml``.

    Inside a run, ``load`` returns the spec the run was started with (ops.spec: pinned under
    ``pins``, named by the run's ``provenance/spec`` tag or pinned by the run's first read), so a
    spec edited while a run goes on changes nothing in that run."""

    directory: str
    pins: str = ""          # the artifact store's root: snapshots go to <pins>/.pins/<name>/ (outside the experiment folder: a refused spec writes nothing there)
    _run = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._run = context.run

    def spec_path(self, name: str) -> Path:
        return Path(self.directory) / f"{name}.yaml"

    def current(self, name: str) -> Spec:
        """The spec file as it is now (sensors, observations)."""
        return load_spec_file(self.spec_path(name))

    def load(self, name: str) -> Spec:
        from ops.spec import SPEC_TAG, load_pinned, pin_for_run

        if self._run is None or not self.pins:
            return self.current(name)
        digest = self._run.tags.get(SPEC_TAG)
        if digest:
            return load_pinned(name, digest, self.pins)
        return pin_for_run(self.spec_path(name), name, self._run.run_id, self.pins)


class ComputeResource(ConfigurableResource):
    """Compute device: ``auto`` takes CUDA when present, else the CPU; ``threads`` caps CPU threads."""

    device: str = "auto"
    threads: int = 0

    def torch_device(self):
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device)


class DeviceError(ValueError):
    """A compute device that is not a device, or not on this machine."""


def resolve_device(name: str):
    """torch.device for ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
    ``mps``; a name that is not a device, or a device this machine does not have, is refused in
    one line naming where it came from."""
    import torch

    where = "compute device (--device or $PROVENANCE_DEVICE)"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{where}: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{where}: {name!r}: provenance runs on auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{where}: {name!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{where}: {name!r} requested but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{where}: {name!r} requested but MPS is not available on this machine")
    return dev
