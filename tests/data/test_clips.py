"""Clip folders and videos for FedSL: ordered frames, even resampling, eye crops, subjects."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from splitfed.data import loaders
from splitfed.data.clip_folders import frame_files, frame_positions, is_clip_root, load_clips
from splitfed.data.clips import ClipDataset, clips_for
from splitfed.data.crop import CropConfig, EyeRegionCropper
from splitfed.emotions import emotion_index
from splitfed.errors import UserError
from tests.data.conftest import clip_frames

# Clips of the clips_dir fixture that load -> (emotion, subject, frames on disk).
KEPT = {
    "Sadness/c04": ("sad", "p2", 5),
    "angry/c03": ("angry", "p1", 6),
    "angry/c05": ("angry", "p3", 12),
    "happy/c01": ("happy", "p1", 5),
    "happy/c02": ("happy", "p2", 7),
    "surprise/c06": ("surprised", "p4", 4),
}


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip-cache")


def test_frame_positions_spread_evenly() -> None:
    assert frame_positions(12, 4).tolist() == [0, 4, 7, 11]
    assert frame_positions(4, 4).tolist() == [0, 1, 2, 3]
    assert frame_positions(2, 4).tolist()[0] == 0 and frame_positions(2, 4).tolist()[-1] == 1


def test_frames_are_ordered_by_their_numbers(tmp_path: Path) -> None:
    for name in ("frame_10.png", "frame_2.png", "frame_1.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [f.name for f in frame_files(tmp_path)] == ["frame_1.png", "frame_2.png", "frame_10.png"]


def test_detect_format_tells_clips_from_stills(clips_dir: Path, folder_dir: Path, kdef_dir) -> None:
    # Frame folders are not guessed: per-person subfolders of photos are a folder-per-class set.
    assert not is_clip_root(clips_dir) and loaders.detect_format(clips_dir) == "folder"
    assert not is_clip_root(folder_dir) and loaders.detect_format(folder_dir) == "folder"
    assert loaders.detect_format(kdef_dir) == "kdef"


def test_load_clips_resamples_crops_and_counts(clips_dir: Path, clip_cache: Path) -> None:
    ds = load_clips(clips_dir, 4, cache_dir=clip_cache)
    assert isinstance(ds, ClipDataset)
    assert ds.clips.shape == (len(KEPT), 4, 1, 48, 96) and ds.clips.dtype == np.uint8
    assert ds.meta["clip_files"] == list(KEPT)
    assert [int(y) for y in ds.labels] == [emotion_index(e) for e, _, _ in KEPT.values()]
    assert ds.subjects is not None
    assert ds.subjects.tolist() == [s for _, s, _ in KEPT.values()]
    assert ds.meta["no_face"] == 1 and ds.meta["no_face_files"] == ["happy/blank"]
    assert ds.meta["unreadable"] == 1 and ds.meta["unreadable_files"] == ["angry/empty"]
    assert ds.meta["not_image"] == 1
    # Frame t of the 12-frame clip is the eye crop of file frame_positions(12, 4)[t].
    i = list(KEPT).index("angry/c05")
    files = frame_files(clips_dir / "angry" / "c05")
    with EyeRegionCropper(CropConfig()) as cropper:
        for t, pos in enumerate(frame_positions(12, 4)):
            want = cropper.crop(cv2.imread(str(files[pos])))
            assert want is not None
            np.testing.assert_array_equal(ds.clips[i, t], want)
    # The frames differ (a zoom and pan), so the order is visible to the model.
    assert not np.array_equal(ds.clips[i, 0], ds.clips[i, -1])
    again = load_clips(clips_dir, 4, cache_dir=clip_cache)
    assert again.meta["cache_hit"] is True
    np.testing.assert_array_equal(again.clips, ds.clips)


def test_video_files_are_clips(tmp_path: Path, astronaut_bgr: np.ndarray) -> None:
    root = tmp_path / "videos"
    (root / "happy").mkdir(parents=True)
    frames = [cv2.resize(f, (256, 256)) for f in clip_frames(astronaut_bgr, 9)]
    path = root / "happy" / "v01.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (256, 256))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    (root / "fear").mkdir()
    for t, f in enumerate(clip_frames(cv2.flip(astronaut_bgr, 1), 3)):
        assert cv2.imwrite(str(root / "fear" / f"c{t}.png"), f)  # a still among clips: not a clip
    folder = root / "fear" / "c1"
    folder.mkdir()
    for t, f in enumerate(frames[:5]):
        assert cv2.imwrite(str(folder / f"{t}.png"), f)
    assert not is_clip_root(root)  # loose stills in a class folder: the folder format
    for f in (root / "fear").glob("c*.png"):
        f.unlink()
    assert is_clip_root(root)
    ds = load_clips(root, 3, use_cache=False)
    assert ds.meta["clip_files"] == ["fear/c1", "happy/v01.avi"]
    assert ds.subjects is None
    decoded = []
    cap = cv2.VideoCapture(str(path))
    while True:
        ok, f = cap.read()
        if not ok:
            break
        decoded.append(f)
    cap.release()
    assert len(decoded) == 9
    with EyeRegionCropper(CropConfig()) as cropper:
        for t, pos in enumerate(frame_positions(9, 3)):
            np.testing.assert_array_equal(ds.clips[1, t], cropper.crop(decoded[pos]))


def test_peak_frames_for_stills_and_clips_for_fedsl(clips_dir: Path, clip_cache: Path) -> None:
    ds = loaders.load_dataset(str(clips_dir), data_format="clips", cache_dir=clip_cache)
    assert ds.meta["format"] == "clips" and ds.has_subjects
    two = load_clips(clips_dir, 2, cache_dir=clip_cache)
    np.testing.assert_array_equal(ds.images, two.clips[:, -1])  # the peak, last frame
    seq = clips_for(ds, 4)
    four = load_clips(clips_dir, 4, cache_dir=clip_cache)
    np.testing.assert_array_equal(seq.clips, four.clips)
    assert seq.meta["sequence"] == "clips of 4 frames"


def test_subjects_csv_must_name_every_clip(clips_dir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(clips_dir, root)
    (root / "subjects.csv").write_text("file,subject\nhappy/c01,p1\n")
    with pytest.raises(UserError, match="no subject"):
        load_clips(root, 2, use_cache=False)


def test_simulate_fedsl_on_clip_folders(
    clips_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aggregator.cli import main

    monkeypatch.setenv("SPLITFED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["simulate", "--algo", "fedsl", "--data", str(clips_dir), "--data-format", "clips",
         "--clients", "2", "--frames",
         "4", "--segments", "2", "--rounds", "2", "--batch-size", "2", "--no-shift",
         "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["sequence"] == "clips of 4 frames"
    assert metrics["data"]["split"] == "subject"
    assert metrics["fedsl"]["frames"] == 4
    assert len(metrics["rounds"]) == 2
