#!/usr/bin/env python
"""Fetch MediaPipe's BlazeFace short-range face detector (Apache-2.0) for the eye-region crop.

Newer mediapipe wheels no longer ship the .tflite files, so this takes it out of an older
wheel on PyPI (0.10.21 on x86_64, 0.10.18 on aarch64) with pip itself: no other network
access is needed. Run once at setup time; the tests and the loaders never download anything.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / "models" / "face_detection_short_range.tflite"
# The file as shipped in mediapipe 0.10.21 (x86_64) and 0.10.18 (aarch64): 229714 bytes.
KNOWN_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wheel_version(machine: str) -> str:
    return "0.10.18" if machine.lower() in ("aarch64", "arm64") else "0.10.21"


def _download_wheel(version: str, workdir: Path, python_version: str | None) -> Path:
    """Download one mediapipe wheel (no dependencies) with the running interpreter's pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"mediapipe=={version}", "-d", str(workdir),
    ]  # fmt: skip
    if python_version:
        # A wheel for another interpreter: any CPython wheel holds the same model file.
        cmd += ["--python-version", python_version]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(workdir.glob("mediapipe-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download gave no mediapipe wheel in {workdir}")
    return wheels[0]


def fetch(dest: Path, version: str | None = None, force: bool = False) -> Path:
    """Put the model at `dest` unless it is already there (idempotent)."""
    if dest.is_file() and not force:
        digest = _sha256(dest)
        note = "" if digest == KNOWN_SHA256 else " (differs from the known 0.10.21 file)"
        print(f"face model already present: {dest} (sha256 {digest}){note}")
        return dest
    version = version or _wheel_version(platform.machine())
    with tempfile.TemporaryDirectory(prefix="splitfed-mp-") as tmp:
        workdir = Path(tmp)
        try:
            wheel = _download_wheel(version, workdir, None)
        except subprocess.CalledProcessError:
            # No wheel of that version for this interpreter: any CPython 3.10 wheel will do.
            wheel = _download_wheel(version, workdir, "3.10")
        with zipfile.ZipFile(wheel) as zf:
            try:
                data = zf.read(MEMBER)
            except KeyError:
                raise SystemExit(f"{wheel.name} has no {MEMBER}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != KNOWN_SHA256:
        print(f"note: sha256 {digest} differs from the known 0.10.21 file {KNOWN_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    part.replace(dest)
    print(f"wrote {dest} ({len(data)} bytes, sha256 {digest}) from {wheel.name}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where to put the .tflite")
    parser.add_argument("--version", default=None, help="mediapipe wheel version to take it from")
    parser.add_argument("--force", action="store_true", help="fetch even if already present")
    args = parser.parse_args(argv)
    fetch(args.dest.expanduser().resolve(), args.version, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
