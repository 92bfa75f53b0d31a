"""The server's temporary datastore: images, their labels and sessions, for MONAI Label clients.

3D Slicer uploads the volume it shows (``PUT /datastore/?image=ID`` or ``PUT /session/``) and then asks for a
segmentation by id; OHIF asks by the series' id. This store keeps such uploads for the server's lifetime (sessions
until they expire) in one temporary folder, removed when the server stops.

Nothing a client sends is used as a path: ids are dictionary keys, every file gets a server-chosen name (only a
whitelisted extension is kept), and answers never contain the server's paths. Limits: a number of files and a
total size (507 when full) and a session lifetime.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FINAL_TAG", "Datastore", "StoreError", "check_id"]

FINAL_TAG = "final"  # MONAI Label's DefaultLabelTag.FINAL: a submitted label
MAX_ID_CHARS = 256
STRATEGIES = {"first": "the first image (upload order) without a final label",
              "random": "a random image without a final label"}


class StoreError(Exception):
    """A client error about stored things: status (404 unknown id, 422 bad id, 507 full) and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_id(value: Any, what: str = "image id") -> str:
    """A client's id: 1..256 printable characters (it is only ever a dictionary key)."""
    if isinstance(value, str) and value and not value.strip():
        raise StoreError(422, f"{what} is blank: give 1 to {MAX_ID_CHARS} printable characters, not only spaces")
    if (not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS
            or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise StoreError(422, f"{what} must be 1 to {MAX_ID_CHARS} printable characters")
    return value


@dataclass
class StoredFile:
    path: Path
    suffix: str
    size: int
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"ext": self.suffix, "info": dict(self.info)}


@dataclass
class ImageRecord:
    image: StoredFile
    labels: dict[str, StoredFile] = field(default_factory=dict)

    def files(self) -> list[StoredFile]:
        return [self.image, *self.labels.values()]


@dataclass
class SessionRecord:
    image: StoredFile
    create_ts: int
    last_access_ts: int
    expiry: int

    def expired(self, now: float) -> bool:
        return now > self.last_access_ts + self.expiry

    def describe(self, session_id: str) -> dict[str, Any]:
        """MONAI Label's SessionInfo, without server paths."""
        return {"name": session_id, "path": "", "image": f"session{self.image.suffix}", "meta": {},
                "create_ts": self.create_ts, "last_access_ts": self.last_access_ts, "expiry": self.expiry}


class Datastore:
    """Uploaded images (by client id), their labels (by tag) and sessions (by server id), thread-safe.

    Args:
        max_files: most files held (images, labels and session images together).
        max_bytes: most bytes held.
        session_expiry: the longest a session lives after its last use, in seconds (and the default).
    """

    def __init__(self, max_files: int = 1000, max_bytes: int = 2 * 2**30, session_expiry: int = 3600) -> None:
        self.max_files = int(max_files)
        self.max_bytes = int(max_bytes)
        self.session_expiry = int(session_expiry)
        self._lock = threading.Lock()
        self._folder: Path | None = None
        self._finalizer: Any = None
        self._images: dict[str, ImageRecord] = {}
        self._sessions: dict[str, SessionRecord] = {}

    # -------------------------------------------------------------------------------------------- files
    def _root(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="medsam3-store-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder

    def close(self) -> None:
        """Forget everything and remove the folder (the server is stopping)."""
        with self._lock:
            self._images.clear()
            self._sessions.clear()
            if self._finalizer is not None:
                self._finalizer()
            self._folder = self._finalizer = None

    def _usage(self) -> tuple[int, int]:
        files = [f for record in self._images.values() for f in record.files()]
        files += [s.image for s in self._sessions.values()]
        return len(files), sum(f.size for f in files)

    def _admit(self, size: int, replacing: Sequence[StoredFile] = ()) -> None:
        self._expire_sessions()
        count, total = self._usage()
        count -= len(replacing)
        total -= sum(f.size for f in replacing)
        if count + 1 > self.max_files or total + size > self.max_bytes:
            raise StoreError(507, f"the server's datastore is full: {count} of {self.max_files} files and "
                                  f"{total / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MiB used, "
                                  f"{size / 2**20:.1f} MiB more asked; remove images or sessions first (the limits "
                                  "are the server's --datastore-max-files and --datastore-max-mb)")

    def _take(self, source: Path, suffix: str, info: dict[str, Any]) -> StoredFile:
        """Move an upload into the store under a new server-chosen name."""
        target = self._root() / f"{uuid.uuid4().hex}{suffix}"
        shutil.move(str(source), str(target))
        return StoredFile(target, suffix, target.stat().st_size, info)

    @staticmethod
    def _drop(*files: StoredFile) -> None:
        for stored in files:
            stored.path.unlink(missing_ok=True)

    @staticmethod
    def _link(stored: StoredFile, folder: Path, stem: str) -> Path:
        """A private name for a stored file in ``folder`` (a hard link; a copy across file systems): it stays
        readable however long the request takes, even if the entry is removed or replaced meanwhile."""
        target = folder / f"{stem}{stored.suffix}"
        try:
            os.link(stored.path, target)
        except OSError:
            shutil.copyfile(stored.path, target)
        return target

    # -------------------------------------------------------------------------------------------- images
    def add_image(self, image_id: str, source: Path, suffix: str, info: dict[str, Any]) -> str:
        """Store ``source`` (moved) as image ``image_id``; an existing image of that id is replaced with its
        labels, as MONAI Label's local datastore does."""
        check_id(image_id)
        size = source.stat().st_size
        info = {**info, "ts": int(time.time()), "name": f"{image_id}{suffix}", "size": size}
        with self._lock:
            old = self._images.get(image_id)
            self._admit(size, old.files() if old else [])
            self._images[image_id] = ImageRecord(self._take(source, suffix, info))
            if old is not None:
                self._drop(*old.files())
        return image_id

    def _record(self, image_id: str) -> ImageRecord:
        record = self._images.get(image_id)
        if record is None:
            raise StoreError(404, f"image {image_id[:MAX_ID_CHARS]!r} is not in the datastore: upload it first "
                                  "(PUT /datastore/?image=ID with the file)")
        return record

    def link_image(self, image_id: str, folder: Path, stem: str = "input") -> Path:
        with self._lock:
            return self._link(self._record(image_id).image, folder, stem)

    def image_info(self, image_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._record(image_id).image.info)

    def remove_image(self, image_id: str) -> None:
        with self._lock:
            record = self._record(image_id)
            del self._images[image_id]
            self._drop(*record.files())

    # -------------------------------------------------------------------------------------------- labels
    def save_label(self, image_id: str, source: Path, suffix: str, tag: str, info: dict[str, Any]) -> str:
        check_id(tag, "label tag")
        size = source.stat().st_size
        info = {**info, "ts": int(time.time()), "name": f"{image_id}{suffix}", "size": size}
        with self._lock:
            record = self._record(image_id)
            old = record.labels.get(tag)
            self._admit(size, [old] if old else [])
            record.labels[tag] = self._take(source, suffix, info)
            if old is not None:
                self._drop(old)
        return image_id  # MONAI Label: the label id is the image id

    def _label(self, image_id: str, tag: str) -> StoredFile:
        label = self._record(image_id).labels.get(tag)
        if label is None:
            raise StoreError(404, f"image {image_id[:MAX_ID_CHARS]!r} has no label tagged {tag[:64]!r}")
        return label

    def link_label(self, image_id: str, tag: str, folder: Path) -> Path:
        with self._lock:
            return self._link(self._label(image_id, tag), folder, "label")

    def label_info(self, image_id: str, tag: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._label(image_id, tag).info)

    def remove_label(self, image_id: str, tag: str) -> None:
        with self._lock:
            label = self._label(image_id, tag)
            del self._images[image_id].labels[tag]
            self._drop(label)

    # -------------------------------------------------------------------------------------------- listings
    def status(self) -> dict[str, Any]:
        """MONAI Label's datastore stats: total images, completed (with a final label), label tag counts."""
        with self._lock:
            tags: dict[str, int] = {}
            for record in self._images.values():
                for tag in record.labels:
                    tags[tag] = tags.get(tag, 0) + 1
            completed = sum(1 for r in self._images.values() if FINAL_TAG in r.labels)
            return {"total": len(self._images), "completed": completed, "label_tags": tags}

    def describe(self) -> dict[str, Any]:
        """MONAI Label's ``datastore()`` (output=all): every image with its extension, info and labels."""
        with self._lock:
            objects = {image_id: {"image": r.image.describe(),
                                  "labels": {tag: label.describe() for tag, label in r.labels.items()}}
                       for image_id, r in self._images.items()}
        return {"name": "medsam3 serve", "description": "temporary datastore (kept until the server stops)",
                "images_dir": "", "labels_dir": "labels", "objects": objects}

    def datalist(self) -> list[dict[str, str]]:
        """(output=train) image and final label ids (MONAI Label gives server paths; these are ids)."""
        with self._lock:
            return [{"image": image_id, "label": image_id} for image_id, r in self._images.items()
                    if FINAL_TAG in r.labels]

    def next_sample(self, strategy: str) -> dict[str, Any]:
        """MONAI Label's active learning answer: ``{"id": ..., **image info}``, or ``{}`` when every image has a
        final label."""
        if strategy not in STRATEGIES:
            raise StoreError(404, f"unknown strategy {strategy[:64]!r}: choose {', '.join(STRATEGIES)}")
        with self._lock:
            unlabeled = [i for i, r in self._images.items() if FINAL_TAG not in r.labels]
            if not unlabeled:
                return {}
            image_id = unlabeled[0] if strategy == "first" else random.choice(unlabeled)
            return {"id": image_id, **self._images[image_id].image.info}

    # -------------------------------------------------------------------------------------------- sessions
    def _expire_sessions(self) -> None:
        now = time.time()
        for session_id in [s for s, record in self._sessions.items() if record.expired(now)]:
            self._drop(self._sessions.pop(session_id).image)

    def add_session(self, source: Path, suffix: str, expiry: int = 0) -> tuple[str, dict[str, Any]]:
        size = source.stat().st_size
        if int(expiry) < 0:
            raise StoreError(422, f"expiry {expiry}: give the seconds a session lives after its last use (0 or none: "
                                  f"the server's {self.session_expiry}, which is also the most)")
        expiry = min(int(expiry), self.session_expiry) if expiry else self.session_expiry
        with self._lock:
            self._admit(size)
            session_id = str(uuid.uuid4())
            now = int(time.time())
            record = SessionRecord(self._take(source, suffix, {}), now, now, expiry)
            self._sessions[session_id] = record
            return session_id, record.describe(session_id)

    def _session(self, session_id: str, touch: bool) -> SessionRecord:
        self._expire_sessions()
        record = self._sessions.get(session_id)
        if record is None:
            raise StoreError(404, f"session {session_id[:64]!r} not found (expired or removed): create one with "
                                  "PUT /session/")
        if touch:
            record.last_access_ts = int(time.time())
        return record

    def session_info(self, session_id: str, touch: bool = False) -> dict[str, Any]:
        with self._lock:
            return self._session(session_id, touch).describe(session_id)

    def link_session(self, session_id: str, folder: Path, stem: str = "input") -> Path:
        with self._lock:
            return self._link(self._session(session_id, True).image, folder, stem)

    def remove_session(self, session_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._session(session_id, False)
            del self._sessions[session_id]
            self._drop(record.image)
            return record.describe(session_id)
