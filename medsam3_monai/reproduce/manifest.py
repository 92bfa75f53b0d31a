"""What a reviewer needs to check a reproduction claim: software versions, the code's commit, the checkpoints'
SHA-256, the command, the device. Stdlib only (torch is asked for its device only when already imported)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "checkpoint_files", "code_revision", "environment", "sha256_file", "write_manifest"]

PACKAGES = ("medsam3-monai", "torch", "torchvision", "transformers", "monai", "pytorch-ignite", "mlflow", "numpy")
_CHUNK = 8 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(source: str) -> list[dict[str, Any]]:
    """``[{path, bytes, sha256}]`` of every file of a checkpoint (a file, or each file under a folder); ``[]`` for
    the random-init ``tiny`` preset, which has no file."""
    if source == "tiny":
        return []
    root = Path(source)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


def code_revision() -> dict[str, Any]:
    """The git commit of this source tree and whether it has uncommitted changes (None outside a checkout)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"path": str(root), "commit": commit, "uncommitted_changes": None if status is None else bool(status)}


def environment() -> dict[str, Any]:
    """Python, platform, package versions and (when torch is loaded) the accelerator."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "processor": platform.machine(), "cpu_count": os.cpu_count(), "packages": versions}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_manifest(path: str | Path, content: Mapping[str, Any]) -> Path:
    """``content`` plus ``written`` (UTC time), environment and code revision, as indented JSON."""
    path = Path(path)
    data = {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **content,
            "environment": environment(), "code": code_revision()}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path
