"""data.py: the user mistakes it must catch with a clear message and no traceback, the ImageFolder
layouts it must read right, and the broken files and caches it must survive."""
import glob
import io
import os
import random
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from machinery import data
from tests.conftest import ROOT, main_of


def test_missing_data_folder_is_a_clear_error(tmp_path):
    r = main_of("train.py", "--data", str(tmp_path / "nowhere"), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "does not exist" in r.stderr and "--data" in r.stderr


def test_empty_class_folders_are_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "cat")
    r = main_of("train.py", "--data", str(tmp_path), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "No images" in r.stderr


def test_corrupt_image_is_a_clear_error(image_root, tmp_path):
    import shutil
    shutil.copytree(image_root / "train", tmp_path / "train")
    bad = tmp_path / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    r = main_of("train.py", "--data", str(tmp_path / "train"), "--device", "cpu", "--epochs", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "broken.jpg" in r.stderr


# --- data.load called directly ---

SHADE = {"ant": 20, "cat": 60, "dog": 100, "frog": 140, "horse": 180}  # one grey level per class


def make_folder(root, classes, n=2):
    """root/<class>/<i>.png: n 8x8 images per class, each of its class's grey level."""
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.new("L", (8, 8), SHADE[c]).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


def no_network(monkeypatch):
    """torchvision's CIFAR-10 fails as it does offline; returns the roots it was asked for."""
    asked = []

    def offline(root, **kw):
        asked.append(root)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(data.torchvision.datasets, "CIFAR10", offline)
    return asked


def test_empty_data_folder_says_how_to_lay_it_out_not_network(tmp_path, monkeypatch):
    asked = no_network(monkeypatch)
    os.makedirs(tmp_path / "mine")
    with pytest.raises(data.DataError) as e:
        data.load(str(tmp_path / "mine"), cache=str(tmp_path / "cache"))
    msg = str(e.value)
    assert "holds no ImageFolder" in msg and "<class>" in msg and "mine" in msg
    assert "network" not in msg and asked == []
    # The default root and a folder holding torchvision's own files still go to torchvision.
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    with pytest.raises(data.DataError, match="network"):
        data.load("data", cache=str(tmp_path / "cache"))
    os.makedirs(tmp_path / "mine" / "cifar-10-batches-py")
    with pytest.raises(data.DataError, match="network"):
        data.load(str(tmp_path / "mine"), cache=str(tmp_path / "cache"))
    assert asked == ["data", str(tmp_path / "mine")]


def test_a_file_given_as_data_is_named_a_file_not_missing(tmp_path):
    archive = tmp_path / "cifar10.tar"
    archive.write_bytes(b"\0" * 512)
    for read in (lambda: data.load(str(archive), cache=str(tmp_path / "cache")),   # train.py, test.py
                 lambda: data.folder_files(str(archive))):                           # train.py --stream
        with pytest.raises(data.DataError) as e:
            read()
        msg = str(e.value)
        assert "is a file, not a folder" in msg and "unpack" in msg and str(archive) in msg, msg
        assert "does not exist" not in msg and "\n" not in msg


@pytest.mark.parametrize("loop", ["image", "images in a cycle", "class folder", "class folders in a cycle",
                                  "test split", "--data itself"])
def test_symlink_loops_are_a_clear_error_not_a_traceback(tmp_path, loop):
    """ELOOP wherever a link loops: every reader of the folder (in memory and --stream) raises a DataError
    naming the link and saying what to do."""
    make_folder(tmp_path / "train", ["cat", "dog"])
    make_folder(tmp_path / "test", ["cat", "dog"])
    root, links = str(tmp_path), {"image": {"train/cat/2.png": "2.png"},
                                  "images in a cycle": {"train/cat/a.png": "b.png", "train/cat/b.png": "a.png"},
                                  "class folder": {"train/emu": "emu"},
                                  "class folders in a cycle": {"train/emu": "gnu", "train/gnu": "emu"},
                                  "test split": {"test/emu": "emu"},
                                  "--data itself": {"loop": "loop"}}[loop]
    for link, target in links.items():
        os.symlink(target, tmp_path / link)
    if loop == "--data itself":
        root = str(tmp_path / "loop")
    for read in (lambda: data.load(root, split="test", cache=str(tmp_path / "cache")),  # reads train/ and test/
                 lambda: data.folder_files(root, split="test")):                        # the --stream listing
        with pytest.raises(data.DataError) as e:
            read()
        msg = str(e.value)
        assert any(str(tmp_path / link) in msg for link in links) and "symbolic link" in msg and "\n" not in msg, msg
    if loop == "image":  # listed before the loop appeared: decoding, and a --stream worker's read
        looped = str(tmp_path / "train/cat/2.png")
        for read in (lambda: data.decode(looped, 8), lambda: data.StreamingFolder([(looped, 0)], 8)[0]):
            with pytest.raises(data.DataError, match="leads back to itself"):
                read()


def test_a_class_folder_link_to_nothing_is_an_error_not_a_missing_class(tmp_path):
    """A class folder linked from a disk that is not mounted: its class silently left out would shift the
    labels of the classes after it."""
    root = make_folder(tmp_path / "train", ["cat", "dog"])
    os.symlink(tmp_path / "unmounted" / "bird", tmp_path / "train" / "bird")
    with pytest.raises(data.DataError) as e:
        data.load(root, cache=str(tmp_path / "cache"))
    assert str(tmp_path / "train" / "bird") in str(e.value) and "does not exist" in str(e.value)


def test_a_class_folder_that_cannot_be_listed_is_a_clear_error(tmp_path, monkeypatch):
    """A class folder without read permission (os.scandir raises PermissionError; root, which runs these
    tests, reads every folder, so the refusal is simulated)."""
    root = make_folder(tmp_path / "train", ["cat", "dog"])
    scandir = os.scandir

    def refuse_dog(path):
        if os.path.basename(path) == "dog":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)
    monkeypatch.setattr(data.os, "scandir", refuse_dog)
    with pytest.raises(data.DataError, match="Permission denied") as e:
        data.load(root, cache=str(tmp_path / "cache"))
    assert str(tmp_path / "train" / "dog") in str(e.value)


def test_hidden_folders_and_files_are_ignored(tmp_path):
    train = make_folder(tmp_path / "train", ["cat", "dog"])
    os.makedirs(tmp_path / "train" / ".ipynb_checkpoints")                 # empty: shifted every label
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\0\5\26\7AppleDouble")  # macOS resource fork
    x, y = data.load(train, cache=str(tmp_path / "cache"))
    assert y.tolist() == [0, 0, 1, 1]
    assert x[:, 0, 0, 0].tolist() == [SHADE["cat"]] * 2 + [SHADE["dog"]] * 2
    os.makedirs(tmp_path / "only-hidden" / ".cache")
    Image.new("L", (8, 8)).save(tmp_path / "only-hidden" / ".cache" / "0.png")
    os.makedirs(tmp_path / "only-hidden" / "cat")
    Image.new("L", (8, 8)).save(tmp_path / "only-hidden" / "cat" / ".0.png")
    assert not data.is_image_folder(str(tmp_path / "only-hidden"))


def test_test_labels_are_the_training_split_class_indices(tmp_path):
    make_folder(tmp_path / "train", ["cat", "dog"])
    make_folder(tmp_path / "test", ["dog"])   # a subset of the training classes: dog is still 1
    cache = str(tmp_path / "cache")
    _, y = data.load(str(tmp_path), split="test", cache=cache)
    assert y.tolist() == [1, 1]
    _, y = data.load(str(tmp_path / "train"), split="test", cache=cache)  # the sibling ../test
    assert y.tolist() == [1, 1]
    make_folder(tmp_path / "train", ["ant"])  # the same test files, but dog is now 2: no stale cache
    _, y = data.load(str(tmp_path), split="test", cache=cache)
    assert y.tolist() == [2, 2]
    make_folder(tmp_path / "test", ["frog", "horse"])
    with pytest.raises(data.DataError) as e:
        data.load(str(tmp_path), split="test", cache=cache)
    assert "classes frog, horse of" in str(e.value) and "training split" in str(e.value)


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """I;16 is divided by 257; I is read as 16-bit (clipped to 0..65535); F is 0..1."""
    root = tmp_path / "train"
    for c in ("f", "i", "i16", "i16b"):
        os.makedirs(root / c)
    ints = np.array([[0, 1000], [30000, 65535]])
    Image.fromarray(ints.astype(np.uint16)).save(root / "i16" / "a.png")
    Image.fromarray(ints.astype(">u2")).save(root / "i16b" / "a.tif")
    Image.fromarray(np.array([[-5, 1000], [30000, 70000]], np.int32)).save(root / "i" / "a.tif")
    Image.fromarray(np.array([[-0.5, 0.25], [1.0, 2.0]], np.float32)).save(root / "f" / "a.tif")
    assert [Image.open(root / c / f).mode for c, f in (("i16", "a.png"), ("i16b", "a.tif"), ("i", "a.tif"),
                                                        ("f", "a.tif"))] == ["I;16", "I;16B", "I", "F"]
    x, y = data.load(str(root), image_size=2, cache=str(tmp_path / "cache"))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 2, 2) and y.tolist() == [0, 1, 2, 3]
    assert (x[0] == torch.tensor([[0, 64], [255, 255]])).all()        # F: 0.25 * 255 = 63.75
    for i in (1, 2, 3):                                                 # 1000 / 257 = 3.9, 30000 / 257 = 116.7
        assert (x[i] == torch.tensor([[0, 4], [117, 255]])).all(), (i, x[i])


class Poison:
    """Unpickled, it would create the file `marker`: the code a malicious cache could run."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("damage", ["truncated", "poisoned", "wrong type", "lengths differ"])
def test_an_unreadable_cache_is_rebuilt(tmp_path, capsys, damage):
    root, cache = make_folder(tmp_path / "train", ["cat", "dog"]), str(tmp_path / "cache")
    x, y = data.load(root, cache=cache)
    [path] = glob.glob(os.path.join(cache, "*.pt"))
    digests = torch.load(path, weights_only=True)[2]
    if damage == "truncated":
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[:len(blob) // 2])
    elif damage == "poisoned":
        torch.save((Poison(str(tmp_path / "marker")), y, digests), path)
    elif damage == "wrong type":
        torch.save((x.float(), y, digests), path)
    else:
        torch.save((x, y[:2], digests), path)
    capsys.readouterr()
    x2, y2 = data.load(root, cache=cache)
    assert torch.equal(x2, x) and torch.equal(y2, y)
    err = capsys.readouterr().err
    assert path in err and "could not be read" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "marker")
    assert all(torch.equal(a, b) for a, b in zip(torch.load(path, weights_only=True), (x, y)))  # rewritten


def test_replaced_images_are_never_served_from_the_cache(tmp_path, capsys, monkeypatch):
    """Another image under the same name, size and modification time (as rsync -t or a restored backup
    leaves it) is decoded again, with a note; an unchanged folder is served from the cache, not decoded."""
    root, cache = make_folder(tmp_path / "train", ["cat", "dog"]), str(tmp_path / "cache")
    data.load(root, cache=cache)
    replaced = str(tmp_path / "train" / "dog" / "1.png")
    before = os.stat(replaced)
    Image.new("L", (8, 8), SHADE["frog"]).save(replaced)
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(replaced).st_size, os.stat(replaced).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    capsys.readouterr()
    x, _ = data.load(root, cache=cache)
    assert x[:, 0, 0, 0].tolist() == [SHADE["cat"]] * 2 + [SHADE["dog"], SHADE["frog"]]
    err = capsys.readouterr().err
    assert "1 of the 4 images" in err and replaced in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr(data, "decode", None)  # decoding now fails: the rewritten cache must be what is read
    x2, _ = data.load(root, cache=cache)
    assert torch.equal(x2, x) and capsys.readouterr().err == ""


@pytest.mark.parametrize("size", [0, -5])
def test_subset_must_be_positive(tmp_path, size):
    with pytest.raises(data.DataError, match="--subset must be a positive number of images"):
        data.subset_indices(10, size, 0)
    with pytest.raises(data.DataError, match="--subset must be a positive number of images"):
        data.load(make_folder(tmp_path / "train", ["cat", "dog"]), subset=size, cache=str(tmp_path / "cache"))


def odd_images(g):
    """Valid images in the modes an ImageFolder meets, each a flat grey level g once decoded to RGB:
    (file name, PIL image, the expected uint8 value)."""
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, g, g, g] * 128)
    see_through = palette.copy()
    see_through.info["transparency"] = 0
    yield from [("l.png", Image.new("L", (8, 8), g), g), ("la.png", Image.new("LA", (8, 8), (g, 99)), g),
                ("p.png", palette, g), ("p-transparent.png", see_through, g), ("p.bmp", palette, g),
                ("rgba.png", Image.new("RGBA", (8, 8), (g, g, g, 7)), g),
                ("cmyk.jpg", Image.new("CMYK", (8, 8), (0, 0, 0, 255 - g)), g),
                ("bit.png", Image.new("1", (8, 8), 1), 255), ("bit.bmp", Image.new("1", (8, 8), 0), 0),
                ("i16.png", Image.fromarray(np.full((8, 8), g * 257, np.uint16)), g),
                ("i.tif", Image.fromarray(np.full((8, 8), g * 257, np.int32)), g),
                ("f.tif", Image.fromarray(np.full((8, 8), g / 255, np.float32)), g),
                ("one.png", Image.new("RGB", (1, 1), (g, g, g)), g),
                ("wide.png", Image.new("RGB", (300, 2), (g, g, g)), g),
                ("tall.webp", Image.new("RGB", (2, 300), (g, g, g)), g)]


def malformed_files(real, rng):
    """(file name, bytes) of broken files: real images cut short, with a wrong magic number or a few
    bytes overwritten, empty files and random bytes, each under an image extension."""
    ext = [".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"]
    for i in range(150):
        name, blob = real[i % len(real)]
        yield f"cut{i}{name}", blob[:rng.randrange(len(blob))]
    for i in range(40):
        name, blob = real[i % len(real)]
        yield f"magic{i}{name}", rng.randbytes(4) + blob[4:]
    for i in range(60):
        name, blob = real[i % len(real)]
        blob = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        yield f"flip{i}{name}", bytes(blob)
    for e in ext:
        yield f"empty{e}", b""
    header = bytearray(dict(real)[".png"])  # a PNG whose header claims 60000 x 60000 pixels: a bomb
    header[16:24] = (60000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(header[12:29]).to_bytes(4, "big")
    yield "bomb.png", bytes(header)
    for i in range(40):
        yield f"random{i}{rng.choice(ext)}", rng.randbytes(rng.randrange(1, 2000))


@pytest.mark.filterwarnings("ignore:Tag data larger than file")  # PIL, on a cut-short TIFF
@pytest.mark.filterwarnings("ignore:Truncated File Read")  # PIL, on the truncated TIFFs it still decodes
def test_fuzz_the_image_folder_loader(image_root, tmp_path):
    """Each file alone in a class folder: it decodes to uint8 N x 3 x S x S (odd modes to the right grey
    level), or fails with a DataError that names it; never another exception."""
    rng, cache = random.Random(0), str(tmp_path / "cache")
    jpgs = sorted(glob.glob(str(image_root / "train" / "*" / "*.jpg")))[:8]
    real = [(".jpg", open(f, "rb").read()) for f in jpgs]
    for f, fmt in zip(jpgs, ["PNG", "BMP", "TIFF", "WEBP", "PPM"]):
        out = io.BytesIO()
        Image.open(f).save(out, fmt)
        real.append(("." + fmt.lower(), out.getvalue()))
    cases = [(name, blob, None) for name, blob in malformed_files(real, rng)]
    cases += [case for g in (0, 77, 255) for case in odd_images(g)]
    cases.append(("broken-link.jpg", "nowhere.jpg", None))
    failed = 0
    for i, (name, content, grey) in enumerate(cases):
        folder = tmp_path / f"{i}" / "c"
        os.makedirs(folder)
        path = str(folder / name)
        if isinstance(content, bytes):
            open(path, "wb").write(content)
        elif isinstance(content, str):
            os.symlink(content, path)
        else:
            content.save(path)
        try:
            x, y = data.load_folder(str(tmp_path / f"{i}"), 8, None, 0, cache, 1)
        except data.DataError as e:
            assert grey is None, f"{name} (g={grey}) is a valid image: {e}"
            assert path in str(e) and "\n" not in str(e), str(e)
            failed += 1
            continue
        assert x.dtype == torch.uint8 and x.shape == (1, 3, 8, 8) and y.tolist() == [0], name
        if grey is not None:
            off = int((x.int() - grey).abs().max())
            assert off <= 2, (name, grey, x[0, :, 0, 0].tolist())
    assert failed > len(cases) // 2  # most of the broken files are caught, not decoded as noise


def test_a_cache_that_cannot_be_written_costs_time_not_the_run(image_root, tmp_path, capsys):
    """sysfs takes no new folders, not even from root: the images still load, with a note."""
    from machinery import data
    images, labels = data.load(str(image_root / "train"), subset=4, cache="/sys/byol-cache")
    assert images.shape == (4, 3, 32, 32) and len(labels) == 4
    assert "not cached" in capsys.readouterr().err


def _view_statistics(views):
    """Per image: brightness, contrast and sharpness: the mean and the std of its pixels (normalised
    units), and the mean step between neighbouring pixels, which the crops' zoom sets."""
    return views.mean((1, 2, 3)), views.std((1, 2, 3)), (views[..., 1:] - views[..., :-1]).abs().mean((1, 2, 3))


def test_streaming_views_follow_the_in_memory_views_distributions(image_root):
    """The same 64 images, 32 draws of both views each way: the workers' crops (StreamingFolder) then
    Augment's device ops, against Augment alone on the in-memory tensor. The mean brightness, contrast
    and sharpness of every view agree within 4 standard errors; taking a second crop of the workers'
    crops, a bug these statistics must see, moves the sharpness by more than that."""
    from augment import Augment
    files = data.folder_files(str(image_root / "train"))
    images, stream, aug = torch.stack([data.decode(f, 32)[0] for f, _ in files]), data.StreamingFolder(files, 32), \
        Augment(32)
    torch.manual_seed(0)
    memory = [aug(images) for _ in range(32)]
    crops = [[torch.stack(c) for c in zip(*(stream[i] for i in range(len(stream))))] for _ in range(32)]
    streamed, recropped = [aug(c) for c in crops], [aug(c[0]) for c in crops]
    for k in (0, 1):                                                        # view 1, view 2
        a, b, c = (_view_statistics(torch.cat([v[k] for v in views])) for views in (memory, streamed, recropped))
        for stat in (0, 1, 2):                                              # brightness, contrast, sharpness
            se = (a[stat].var() / len(a[stat]) + b[stat].var() / len(b[stat])).sqrt()
            assert (a[stat].mean() - b[stat].mean()).abs() < 4 * se, (k, stat)
        se = (a[2].var() / len(a[2]) + c[2].var() / len(c[2])).sqrt()
        assert (a[2].mean() - c[2].mean()).abs() > 4 * se, k


def test_a_stream_worker_error_reaches_the_user_as_our_message_alone(image_root, tmp_path):
    """DataLoader re-raises a worker's DataError with the worker's traceback as its message; the user must
    read what a reader in this process would have raised: one paragraph naming the file."""
    from machinery import batches
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    stream = data.StreamingFolder(data.folder_files(str(image_root / "train"))[:3] + [(str(bad), 0)], 8)
    with pytest.raises(data.DataError) as here:
        stream[3]
    with pytest.raises(data.DataError) as worker:
        list(batches.stream_batches(stream, torch.arange(4), 0, {"batch_size": 4, "workers": 1}, 0, 1,
                                    torch.device("cpu")))
    assert str(worker.value) == str(here.value) and str(bad) in str(here.value) and "\n" not in str(here.value)


def test_a_process_that_stops_mid_epoch_ends_its_stream_workers_and_exits(image_root):
    """The workers ignore SIGTERM (so that a preemption reaches the main process alone), which is how
    multiprocessing's exit handler ends them: a process leaving mid-epoch, its generator still open, used to
    wait for them forever. It must exit at once, and a closed generator must leave no worker behind."""
    import subprocess
    import sys
    script = f"""if True:
        import multiprocessing, sys, torch
        from machinery import batches, data
        stream = data.StreamingFolder(data.folder_files({str(image_root / "train")!r})[:8], 8)
        cfg, cpu = {{"batch_size": 2, "workers": 2}}, torch.device("cpu")
        closed = batches.stream_batches(stream, torch.arange(8), 0, cfg, 0, 1, cpu)
        next(closed)
        closed.close()
        assert not multiprocessing.active_children(), "a closed generator left its workers"
        left_open = batches.stream_batches(stream, torch.arange(8), 0, cfg, 0, 1, cpu)
        next(left_open)
        sys.exit(0)"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---- Caches only this user can write, and regular files only (issue 23) -----------------------------

@pytest.mark.parametrize("plant, said", [("another user's", "another user"), ("writable by others", "others can write"),
                                         ("a link", "symbolic link"), ("a FIFO", "FIFO")])
def test_a_planted_cache_is_ignored_with_a_note_and_rebuilt(tmp_path, capsys, monkeypatch, plant, said):
    """Another local user could plant a cache with the right digests and other pixels, trained and evaluated on
    without a word (its owner was never checked), or a FIFO, on which every run hung. (Not as root, the file
    cannot be given away: this user's uid is then stood in for by another, while the planted cache is read.)"""
    root, cache = make_folder(tmp_path / "train", ["cat", "dog"]), str(tmp_path / "cache")
    x, y = data.load(root, cache=cache)
    [path] = glob.glob(os.path.join(cache, "*.pt"))
    poisoned = (torch.full_like(x, 7), y, torch.load(path, weights_only=True)[2])
    os.remove(path)
    if plant == "a link":
        torch.save(poisoned, tmp_path / "elsewhere.pt")
        os.symlink(tmp_path / "elsewhere.pt", path)
    elif plant == "a FIFO":
        os.mkfifo(path)
    else:
        torch.save(poisoned, path)
        if plant == "writable by others":
            os.chmod(path, 0o666)
        elif os.getuid() == 0:
            os.chown(path, 4242, 4242)
        else:
            monkeypatch.setattr(os, "getuid", lambda uid=os.getuid(): uid + 1)
    capsys.readouterr()
    x2, _ = data.load(root, cache=cache)
    monkeypatch.undo()
    assert torch.equal(x2, x)                                             # the images' own pixels, and no hang
    err = capsys.readouterr().err
    assert path in err and said in err and "decoding the images again" in err, err
    assert os.stat(path, follow_symlinks=False).st_uid == os.getuid() and torch.equal(data.load(root, cache=cache)[0], x)


def test_a_new_cache_folder_and_its_files_are_this_users_alone(tmp_path):
    cache = tmp_path / "new" / "cache"
    data.load(make_folder(tmp_path / "train", ["cat", "dog"]), cache=str(cache))
    assert os.stat(cache).st_mode & 0o777 == 0o700
    assert [os.stat(f).st_mode & 0o777 for f in glob.glob(str(cache / "*.pt"))] == [0o600]


def test_old_cache_files_are_pruned_and_nothing_else(tmp_path):
    """prune_cache, run at each write: of this user's cache files the 8 used last stay, unless unused for 30
    days; a killed write's temporary over a day old goes; a user's file, another user's, a link stay."""
    cache, now = tmp_path / "cache", time.time()
    cache.mkdir()

    def made(name, hours_ago, owner=None):
        (cache / name).write_bytes(b"x")
        os.utime(cache / name, (now - 3600 * hours_ago, now - 3600 * hours_ago))
        if owner:
            os.chown(cache / name, owner, owner)
        return name
    used = [made(f"imagefolder-32px-{i:016x}.pt", i) for i in range(10)]          # used 0 to 9 hours ago
    stale = made(f"imagefolder-96px-{99:016x}.pt", 24 * 40)
    kept = {made("notes.txt", 24 * 400), made(f".imagefolder-32px-{5:016x}.pt.abcd1234.tmp", 1)}
    if os.getuid() == 0:                                  # (only root can give a file to another user)
        kept.add(made(f"imagefolder-32px-{77:016x}.pt", 24 * 400, owner=4242))
    killed = made(f".imagefolder-32px-{6:016x}.pt.k2x9_a1q.tmp", 48)
    (tmp_path / "outside.pt").write_bytes(b"mine")
    os.symlink(tmp_path / "outside.pt", cache / f"imagefolder-32px-{88:016x}.pt")
    data.prune_cache(str(cache))
    assert set(os.listdir(cache)) == set(used[:8]) | kept | {f"imagefolder-32px-{88:016x}.pt"}
    assert stale not in os.listdir(cache) and killed not in os.listdir(cache)
    assert (tmp_path / "outside.pt").read_bytes() == b"mine"


@pytest.mark.parametrize("kind, said", [("fifo", "FIFO"), ("/dev/zero", "character device"), ("huge", "more than")])
def test_an_image_that_is_no_regular_file_or_too_large_is_named_not_a_hang(tmp_path, monkeypatch, kind, said):
    """A FIFO as an image hung; a link to /dev/zero read without end and then blamed the batch size."""
    root = make_folder(tmp_path / "train", ["cat", "dog"])
    path = str(tmp_path / "train" / "cat" / "x.png")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        os.symlink("/dev/zero", path)
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(path)  # 4 kB
        monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 1000)                                         # the others: 70 B
    files = data.folder_files(root)
    for read in (lambda: data.load(root, cache=str(tmp_path / "cache")),              # in memory
                 lambda: data.StreamingFolder(files, 8)[[f for f, _ in files].index(path)]):   # a --stream worker
        with pytest.raises(data.DataError) as e:
            read()
        assert path in str(e.value) and said in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_ctrl_c_while_decoding_drops_the_queued_images(tmp_path, monkeypatch):
    """The decode pool used to wait for every queued image after Ctrl-C (minutes, on a large folder)."""
    root, started, decode = make_folder(tmp_path / "train", ["cat", "dog"], n=40), [], data.decode

    def interrupted_at_the_first(file, image_size):
        started.append(file)
        if len(started) == 1:
            raise KeyboardInterrupt
        time.sleep(0.01)
        return decode(file, image_size)
    monkeypatch.setattr(data, "decode", interrupted_at_the_first)
    with pytest.raises(KeyboardInterrupt):
        data.load(root, cache=str(tmp_path / "cache"), workers=1)
    assert len(started) < 10                                          # of 80 queued


def test_images_in_sub_folders_of_a_class_are_named_not_skipped_silently(tmp_path, capsys):
    root = make_folder(tmp_path / "train", ["cat", "dog"])
    make_folder(tmp_path / "train" / "cat", ["ant"])                  # train/cat/ant/0.png, 1.png
    _, y = data.load(root, cache=str(tmp_path / "cache"))
    err = capsys.readouterr().err
    assert len(y) == 4 and os.path.join(root, "cat", "ant") in err and "not read" in err, err


def test_a_fifo_among_the_cifar_binaries_is_named_before_torchvision_reads_it(tmp_path):
    """torchvision hashes its files on trust: a FIFO there hung it."""
    os.makedirs(tmp_path / "data" / "cifar-10-batches-py")
    os.mkfifo(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1")
    with pytest.raises(data.DataError, match="data_batch_1.*FIFO"):
        data.load(str(tmp_path / "data"), cache=str(tmp_path / "cache"))
