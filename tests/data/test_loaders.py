"""Data-set loaders: KDEF names, class folders, FER2013 CSV, problem counts and the cache."""

from __future__ import annotations

import logging
import os
import sys
import types

import numpy as np
import pytest

from splitfed.data import loaders
from splitfed.data.crop import CropConfig
from splitfed.data.dataset import EmotionDataset, default_split, train_test_split
from splitfed.data.partition import client_shards
from splitfed.emotions import EMOTIONS, FER2013_TO_INDEX
from splitfed.errors import UserError

# Straight-on KDEF files of the kdef_dir fixture -> (emotion, subject).
KDEF_KEPT = {
    "AF01AFS.JPG": ("afraid", "F01"),
    "AF01HAS.JPG": ("happy", "F01"),
    "AM02ANS.JPG": ("angry", "M02"),
    "BF01SUS.JPG": ("surprised", "F01"),
}


def _rows(ds: EmotionDataset) -> list[tuple[str, str]]:
    assert ds.subjects is not None
    return sorted(
        (EMOTIONS[int(lab)], str(s)) for lab, s in zip(ds.labels, ds.subjects, strict=True)
    )


def test_detect_format(kdef_dir, folder_dir, fer_csv) -> None:
    assert loaders.detect_format("synth") == "synth"
    assert loaders.detect_format(kdef_dir) == "kdef"
    assert loaders.detect_format(folder_dir) == "folder"
    assert loaders.detect_format(fer_csv) == "fer2013"


def test_kdef_labels_subjects_and_problem_counts(kdef_dir, tmp_path) -> None:
    ds = loaders.load_dataset(str(kdef_dir), cache_dir=tmp_path)
    assert ds.images.shape == (4, 1, 48, 96) and ds.images.dtype == np.uint8
    assert _rows(ds) == sorted(KDEF_KEPT.values())
    meta = ds.meta
    assert meta["format"] == "kdef"
    assert meta["unreadable"] == 1 and meta["unreadable_files"] == ["AM02/AM02DIS.JPG"]
    assert meta["no_face"] == 1 and meta["no_face_files"] == ["AM02/AM02NES.JPG"]
    assert meta["excluded_angle"] == 1 and meta["excluded_angle_files"] == ["AF01/AF01HAHL.JPG"]
    assert meta["ignored"] == 1 and meta["ignored_files"] == ["README.txt"]
    assert meta["cache_hit"] is False
    assert sorted(np.asarray(meta["sessions"]).tolist()) == ["A", "A", "A", "B"]


def test_kdef_all_angles_keeps_half_profiles(kdef_dir, tmp_path) -> None:
    ds = loaders.load_dataset(str(kdef_dir), "kdef", cache_dir=tmp_path, all_angles=True)
    assert len(ds) == 5
    assert ds.meta["excluded_angle"] == 0
    assert ("happy", "F01") in _rows(ds)


def test_kdef_with_haar_backend(kdef_dir, tmp_path) -> None:
    ds = loaders.load_dataset(str(kdef_dir), crop=CropConfig(detector="haar"), cache_dir=tmp_path)
    assert ds.meta["backend"] == "haar"
    assert _rows(ds) == sorted(KDEF_KEPT.values())


def test_second_load_is_a_cache_hit(kdef_dir, tmp_path, monkeypatch) -> None:
    first = loaders.load_dataset(str(kdef_dir), cache_dir=tmp_path)
    assert first.meta["cache_hit"] is False
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_detection(*args, **kwargs):
        raise AssertionError("a cache hit must not run face detection")

    monkeypatch.setattr(loaders, "EyeRegionCropper", no_detection)
    second = loaders.load_dataset(str(kdef_dir), cache_dir=tmp_path)
    assert second.meta["cache_hit"] is True
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.subjects, first.subjects)
    for key in ("unreadable", "no_face", "excluded_angle", "no_face_files", "backend"):
        assert second.meta[key] == first.meta[key]
    np.testing.assert_array_equal(second.meta["sessions"], first.meta["sessions"])


def test_cache_misses_when_settings_or_files_change(folder_dir, tmp_path) -> None:
    base = loaders.load_dataset(str(folder_dir), cache_dir=tmp_path)
    small = loaders.load_dataset(
        str(folder_dir), crop=CropConfig(height=24, width=48), cache_dir=tmp_path
    )
    assert small.meta["cache_hit"] is False and small.images.shape[1:] == (1, 24, 48)
    again = loaders.load_dataset(str(folder_dir), cache_dir=tmp_path)
    assert again.meta["cache_hit"] is True
    # Touching a file (new mtime) invalidates the entry.
    target = folder_dir / "SAD" / "d.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed = loaders.load_dataset(str(folder_dir), cache_dir=tmp_path)
    assert changed.meta["cache_hit"] is False
    np.testing.assert_array_equal(changed.images, base.images)


def test_cache_dir_from_environment(folder_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPLITFED_CACHE", str(tmp_path / "envcache"))
    ds = loaders.load_dataset(str(folder_dir))
    assert str(ds.meta["cache_file"]).startswith(str(tmp_path / "envcache"))


def test_folder_per_class_with_synonyms_and_subjects(folder_dir, tmp_path) -> None:
    ds = loaders.load_dataset(str(folder_dir), cache_dir=tmp_path)
    assert ds.images.shape == (4, 1, 48, 96)
    assert _rows(ds) == sorted([("afraid", "p1"), ("happy", "p2"), ("happy", "p1"), ("sad", "p2")])
    assert ds.meta["format"] == "folder" and ds.meta["no_face"] == 0


def test_folder_without_subjects_csv_warns_that_people_mix(tmp_path, astronaut_bgr, caplog) -> None:
    import cv2

    root = tmp_path / "plain"
    (root / "angry").mkdir(parents=True)
    cv2.imwrite(str(root / "angry" / "x.png"), astronaut_bgr)
    cv2.imwrite(str(root / "angry" / "y.png"), cv2.flip(astronaut_bgr, 1))
    (root / "angry" / "notes.txt").write_text("hello")
    ds = loaders.load_dataset(str(root), cache_dir=tmp_path / "cache")
    assert ds.subjects is None and ds.labels.tolist() == [EMOTIONS.index("angry")] * 2
    assert ds.meta["not_image"] == 1 and ds.meta["not_image_files"] == ["angry/notes.txt"]
    assert ds.meta["unreadable"] == 0
    assert default_split(ds) == "random"
    with caplog.at_level(logging.WARNING, logger="splitfed.data.dataset"):
        train_test_split(ds, "random")
        train_test_split(ds, "random", seed=1)
    warnings = [r.getMessage() for r in caplog.records if "cannot keep people apart" in r.message]
    assert len(warnings) == 1 and "subjects.csv" in warnings[0]  # the fix, said once


def test_subject_split_gives_no_mixing_warning(folder_dir, tmp_path, caplog) -> None:
    ds = loaders.load_dataset(str(folder_dir), cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        train, test = train_test_split(ds, default_split(ds))
    assert set(train.subjects).isdisjoint(set(test.subjects))
    assert not [r for r in caplog.records if "people apart" in r.getMessage()]


def test_unknown_class_folders_and_non_images_are_skipped_and_named(
    tmp_path, astronaut_bgr, caplog
) -> None:
    import cv2

    root = tmp_path / "mixed"
    for name in ("happy", "bored", "misc"):
        (root / name).mkdir(parents=True)
        cv2.imwrite(str(root / name / "a.png"), astronaut_bgr)
    (root / "happy" / "labels.json").write_text("{}")
    (root / "happy" / "clip.mp4").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING, logger="splitfed.data.loaders"):
        ds = loaders.load_dataset(str(root), "folder", cache_dir=tmp_path / "cache")
    assert len(ds) == 1 and ds.labels.tolist() == [EMOTIONS.index("happy")]
    assert ds.meta["unknown_class"] == 2 and ds.meta["unknown_class_files"] == ["bored/", "misc/"]
    assert ds.meta["not_image"] == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "2 folder(s) not named after an emotion" in text and "bored/, misc/" in text
    assert "2 file(s) not image files" in text and "happy/clip.mp4" in text
    report = loaders.report_text(loaders.prepare_report(ds))
    assert "unknown class" in report and "bored/" in report


def test_only_unknown_class_folders_is_a_one_line_user_error(tmp_path) -> None:
    root = tmp_path / "bad"
    (root / "bored").mkdir(parents=True)
    with pytest.raises(UserError, match="no class folders") as info:
        loaders.load_dataset(str(root), "folder", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_fer2013_folder_form_keeps_its_own_split(fer_folder, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="splitfed.data.loaders"):
        ds = loaders.load_dataset(str(fer_folder), cache_dir=tmp_path)
    assert loaders.detect_format(fer_folder) == "folder"
    assert len(ds) == 14 and ds.images.shape[1:] == (1, 48, 96)
    assert ds.meta["no_face"] == 0  # 48x48 aligned faces: cut at fixed rows, no detector
    assert ds.meta["unknown_class_files"] == ["train/contempt/"]
    assert ds.meta["not_image_files"] == ["train/happy/Thumbs.db"]
    assert any("train/contempt/" in r.getMessage() for r in caplog.records)
    assert default_split(ds) == "predefined"
    train, test = train_test_split(ds, default_split(ds))
    assert len(train) == 10 and len(test) == 4
    assert train.class_counts()["afraid"] == 2 and train.class_counts()["surprised"] == 1
    assert test.class_counts() == {
        **{e: 0 for e in EMOTIONS},
        "angry": 1,
        "happy": 2,
        "disgusted": 1,
    }
    assert set(np.asarray(test.meta["split_role"]).tolist()) == {"test"}  # meta follows subsets
    hit = loaders.load_dataset(str(fer_folder), cache_dir=tmp_path)
    assert hit.meta["cache_hit"] is True and default_split(hit) == "predefined"
    report = loaders.prepare_report(hit)
    assert report["own_split"] == {"train": 10, "test": 4}
    assert "own split is used by default: 10 train / 4 test" in loaders.report_text(report)


def test_fer2013_folder_crop_matches_the_csv_form(fer_folder, tmp_path) -> None:
    import cv2

    face = cv2.imread(str(fer_folder / "test" / "disgust" / "te_00000.jpg"), cv2.IMREAD_GRAYSCALE)
    ds = loaders.load_dataset(str(fer_folder), cache_dir=tmp_path)
    i = int(np.flatnonzero(ds.labels == EMOTIONS.index("disgusted"))[0])
    np.testing.assert_array_equal(ds.images[i], loaders.fer2013_crop(face, CropConfig()))


def test_fer2013_csv(fer_csv, tmp_path) -> None:
    ds = loaders.load_dataset(str(fer_csv), cache_dir=tmp_path)
    assert ds.images.shape == (6, 1, 48, 96) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == [FER2013_TO_INDEX[i] for i in (0, 1, 2, 3, 5, 6)]
    assert ds.subjects is None
    assert np.asarray(ds.meta["usage"]).tolist() == [
        "Training", "Training", "PublicTest", "Training", "PrivateTest", "Training",
    ]  # fmt: skip
    assert ds.meta["unreadable"] == 1 and ds.meta["unreadable_files"] == ["line 8"]
    hit = loaders.load_dataset(str(fer_csv), "fer2013", cache_dir=tmp_path)
    assert hit.meta["cache_hit"] is True
    np.testing.assert_array_equal(hit.meta["usage"], ds.meta["usage"])


def test_fer2013_csv_uses_its_usage_split(fer_csv, tmp_path) -> None:
    ds = loaders.load_dataset(str(fer_csv), cache_dir=tmp_path)
    assert default_split(ds) == "predefined"
    train, test = train_test_split(ds, default_split(ds), seed=5)
    assert np.asarray(train.meta["usage"]).tolist() == ["Training"] * 4
    assert sorted(np.asarray(test.meta["usage"]).tolist()) == ["PrivateTest", "PublicTest"]
    _, shard_test, _ = client_shards(ds, 2)  # what simulate and --shard do by default
    assert len(shard_test) == 2


def test_fer2013_csv_without_test_rows_has_no_split_of_its_own(tmp_path) -> None:
    rows = ["emotion,pixels,Usage"] + [
        f"{i % 7},{' '.join(['128'] * (48 * 48))},Training" for i in range(4)
    ]
    path = tmp_path / "train_only.csv"
    path.write_text("\n".join(rows) + "\n")
    ds = loaders.load_dataset(str(path), cache_dir=tmp_path / "c")
    assert ds.split_roles is None and default_split(ds) == "random"
    with pytest.raises(UserError, match="has none"):
        train_test_split(ds, "predefined")


def test_fer2013_crop_takes_the_upper_band() -> None:
    face = np.zeros((48, 48), np.uint8)
    face[:24] = 200  # bright upper half (eyes/forehead), dark lower half (mouth)
    out = loaders.fer2013_crop(face, CropConfig())
    assert out.shape == (1, 48, 96)
    assert out[0, :40].mean() > 190  # mostly the bright upper band
    rgb = loaders.fer2013_crop(face, CropConfig(grayscale=False))
    assert rgb.shape == (3, 48, 96)


def test_synth_dispatches_to_generate_synth(monkeypatch) -> None:
    fake = types.ModuleType("splitfed.data.synth")
    made = EmotionDataset(
        name="synth", images=np.zeros((2, 1, 48, 96), np.uint8), labels=np.array([0, 1])
    )
    fake.generate_synth = lambda config=None: made  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "splitfed.data.synth", fake)
    assert loaders.load_dataset("synth") is made
    assert loaders.load_dataset("ignored", data_format="synth") is made


def test_missing_path_is_a_user_error(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="no such file or folder"):
        loaders.load_dataset(str(missing), cache_dir=tmp_path)


def test_empty_results_are_user_errors(tmp_path) -> None:
    import cv2

    root = tmp_path / "KDEF"
    root.mkdir()
    cv2.imwrite(str(root / "AF01NES.JPG"), np.full((200, 200, 3), 90, np.uint8))
    with pytest.raises(UserError, match=r"no usable images .*1 without a detectable face"):
        loaders.load_dataset(str(root), "kdef", cache_dir=tmp_path / "c")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="cannot tell the data-set format"):
        loaders.load_dataset(str(empty), cache_dir=tmp_path / "c2")
    with pytest.raises(UserError, match="unknown data format"):
        loaders.load_dataset(str(root), "imagenet")


def test_prepare_report(kdef_dir, tmp_path) -> None:
    ds, report = loaders.prepare(str(kdef_dir), cache_dir=tmp_path)
    assert report["images"] == len(ds) == 4
    assert report["classes"]["happy"] == 1 and sum(report["classes"].values()) == 4
    assert report["subjects"] == {"F01": 3, "M02": 1}
    assert report["no_face"] == 1 and report["unreadable"] == 1
    text = loaders.report_text(report)
    for needle in ("F01", "happy", "no face", "unreadable", "AM02DIS.JPG"):
        assert needle in text


def test_folder_of_eye_crops_loads_without_detection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Crops stored by `edge-agent collect` are already at crop size: no face to find again."""
    import cv2

    rng = np.random.default_rng(0)
    for name in ("happy", "sad"):
        (tmp_path / name).mkdir()
        for i in range(3):
            cv2.imwrite(
                str(tmp_path / name / f"{i}.png"), rng.integers(0, 255, (48, 96), dtype=np.uint8)
            )
    ds = loaders.load_dataset(str(tmp_path), data_format="folder", use_cache=False)
    assert len(ds) == 6 and ds.images.shape == (6, 1, 48, 96)
    assert ds.class_counts()["happy"] == 3 and ds.meta["no_face"] == 0
