"""The artifact store on shared storage: a local working copy mirrored to an fsspec URL.

Every stage reads and writes the local store (``<home>/artifacts``) as on one machine: memory maps,
atomic renames and safetensors headers all need a POSIX file.  With ``PROVENANCE_STORE_URL`` set
(``s3://bucket/provenance``, ``gs://...``, ``file:///mnt/shared/provenance``, any fsspec protocol
whose package is installed), a step first *pulls* the experiment's files that changed on the
shared store since this machine last saw them, and afterwards *pushes* the files it wrote.  So a
step may run on any machine (celery or Kubernetes workers): it sees every upstream artifact, and
what it produced is there for the next step, wherever that runs.

Consistency is per file, as in the local store: an upload goes to a temporary name and is moved
into place, and a download is renamed into place, so a reader sees a whole artifact or none.  A
step that crashes before its push leaves nothing on the shared store; its retry recomputes.
Deleting an experiment (``./provenance delete``) deletes it on the shared store too.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path


class MirrorError(RuntimeError):
    """The shared store cannot be reached or read (names the URL)."""


def _is_temporary(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def _stamp(info: dict) -> str:
    """What identifies one version of a remote file: size plus whatever the backend offers
    (ETag, modification time, checksum)."""
    keys = ("ETag", "etag", "md5Hash", "crc32c", "LastModified", "mtime", "updated", "created")
    return json.dumps([info.get("size")] + [str(info[k]) for k in keys if k in info])


class StoreMirror:
    """``local`` (a folder) mirrored to ``url`` (an fsspec URL) by relative path."""

    def __init__(self, url: str, local: str | os.PathLike):
        import fsspec

        try:
            self.fs, base = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise MirrorError(f"PROVENANCE_STORE_URL={url}: {e}") from None
        self.url, self.base = url, base.rstrip("/")
        self.local = Path(local)
        self._manifest_path = self.local / ".mirror" / "manifest.json"

    # ------------------------------------------------------------------ bookkeeping
    def _manifest(self) -> dict:
        try:
            return json.loads(self._manifest_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_manifest(self, manifest: dict) -> None:
        self._manifest_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._manifest_path.parent, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, self._manifest_path)

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def _listing(self, prefix: str) -> dict[str, dict]:
        root = self._remote(prefix.strip("/"))
        try:
            if not self.fs.exists(root):
                return {}
            found = self.fs.find(root, detail=True)
        except OSError as e:
            raise MirrorError(f"{self.url}: cannot list {prefix!r}: {e}") from None
        out = {}
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            rel = path[len(self.base):].lstrip("/") if path.startswith(self.base) else path
            # some filesystems strip the protocol's leading slash: match on the prefix's position
            if not rel.startswith(prefix.strip("/")):
                rel = rel[rel.find(prefix.strip("/")):]
            if not _is_temporary(rel):
                out[rel] = info
        return out

    # ------------------------------------------------------------------ the two directions
    def snapshot(self, prefix: str) -> dict[str, list[int]]:
        """(size, mtime_ns) of every local file under ``prefix`` (to tell later what a step wrote)."""
        root = self.local / prefix
        out = {}
        if root.is_dir():
            for p in root.rglob("*"):
                rel = p.relative_to(self.local).as_posix()
                if p.is_file() and not _is_temporary(rel):
                    st = p.stat()
                    out[rel] = [st.st_size, st.st_mtime_ns]
        return out

    def pull(self, prefix: str) -> int:
        """Download the files under ``prefix`` that are new or changed on the shared store since
        this machine last pulled or pushed them.  Returns how many were downloaded."""
        manifest = self._manifest()
        n = 0
        for rel, info in self._listing(prefix).items():
            stamp = _stamp(info)
            dest = self.local / rel
            if manifest.get(rel) == stamp and dest.is_file() and dest.stat().st_size == info.get("size"):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            os.close(fd)
            try:
                self.fs.get_file(self._remote(rel), tmp)
                os.replace(tmp, dest)
            except OSError as e:
                raise MirrorError(f"{self.url}: cannot download {rel}: {e}") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            manifest[rel] = stamp
            n += 1
        self._save_manifest(manifest)
        return n

    def push(self, prefix: str, before: dict | None = None) -> int:
        """Upload the local files under ``prefix`` that are new or changed since the snapshot
        ``before`` (all of them when it is None).  Returns how many were uploaded."""
        manifest = self._manifest()
        now = self.snapshot(prefix)
        n = 0
        for rel, stat in sorted(now.items()):
            if before is not None and before.get(rel) == stat:
                continue
            remote = self._remote(rel)
            parent = remote.rsplit("/", 1)[0]
            tmp = f"{parent}/.{rel.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                self.fs.makedirs(parent, exist_ok=True)
                self.fs.put_file(str(self.local / rel), tmp)
                self.fs.mv(tmp, remote)
                manifest[rel] = _stamp(self.fs.info(remote))
            except OSError as e:
                raise MirrorError(f"{self.url}: cannot upload {rel}: {e}") from None
            n += 1
        self._save_manifest(manifest)
        return n

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` from the shared store (and from this machine's manifest)."""
        root = self._remote(prefix.strip("/"))
        if self.fs.exists(root):
            self.fs.rm(root, recursive=True)
        manifest = {k: v for k, v in self._manifest().items() if not k.startswith(prefix.strip("/"))}
        self._save_manifest(manifest)


def mirror_from_env(local: str | os.PathLike) -> StoreMirror | None:
    url = os.environ.get("PROVENANCE_STORE_URL", "").strip()
    return StoreMirror(url, local) if url else None
