"""data.py: the user mistakes it must catch with a clear message and no traceback."""
import os

from tests.conftest import run


def test_missing_data_folder_is_a_clear_error(tmp_path):
    r = run("train.py", "--data", str(tmp_path / "nowhere"), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "does not exist" in r.stderr and "--data" in r.stderr


def test_empty_class_folders_are_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "cat")
    r = run("train.py", "--data", str(tmp_path), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "No images" in r.stderr


def test_corrupt_image_is_a_clear_error(image_root, tmp_path):
    import shutil
    shutil.copytree(image_root / "train", tmp_path / "train")
    bad = tmp_path / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    r = run("train.py", "--data", str(tmp_path / "train"), "--device", "cpu", "--epochs", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "broken.jpg" in r.stderr
