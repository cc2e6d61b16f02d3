"""test.py: linear evaluation and kNN of a trained run, its command line, the 1% / 10% label subsets
and semi-supervised fine-tuning; and what test.py survives (docs/reliability.md, "What survives what")."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import test as evaluate
from machinery.files import UserError
from tests.conftest import ROOT, main_of, run


def _copy(trained, tmp_path, *names):
    """The tiny run's files (encoder.pt, config.json and log.jsonl unless named) in a fresh folder, so that no
    test changes the session's run; copy2 keeps their times (encoder.pt stays newer than checkpoint.pt)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in names or ("encoder.pt", "config.json", "log.jsonl"):
        shutil.copy2(os.path.join(trained, name), out / name)
    return str(out)


def _quick(image_root):
    return ["--data", str(image_root), "--epochs", "1", "--device", "cpu"]


def test_evaluate_run(trained, image_root):
    result = evaluate.main([trained, "--data", str(image_root), "--epochs", "5", "--device", "cpu"])
    assert set(result) >= {"top1", "top5", "knn_top1"}
    assert result["n_train"] == 64 and result["n_test"] == 32
    assert 0 <= result["top1"] <= result["top5"] <= 1 and 0 <= result["knn_top1"] <= 1
    assert json.load(open(os.path.join(trained, "eval.json")))["top1"] == result["top1"]
    assert result["protocol"] == "fixed-lr" and result["lr"] == 0.1 and result["epochs"] == 5


def test_evaluate_cli_prints_json_last(trained, image_root):
    r = main_of("test.py", os.path.join(trained, "checkpoint.pt"), "--data", str(image_root), "--epochs", "2",
            "--augment", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["augment"] is True


class _Pickled:
    """A pickle that would create `marker` when loaded without weights_only."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content, message", [
    ("code", "refused to load"),
    (torch.zeros(3), "holds a Tensor, not an encoder"),
    ([1, 2], "holds a list, not an encoder"),
    ("nan", "NaN or Inf weights"),
    (b"PK\x03\x04 cut short", "cannot be read"),
])
def test_encoder_files_that_are_not_an_encoder_are_clear_errors(trained, tmp_path, content, message):
    """A pickle that would run code is refused and runs nothing; a tensor, a list, non-finite weights
    (a diverged run) and a truncated file each get their own message."""
    marker, path = tmp_path / "ran", tmp_path / "encoder.pt"
    if content == "code":
        torch.save({"conv1.weight": _Pickled(str(marker))}, path)
    elif content == "nan":
        state = torch.load(os.path.join(trained, "encoder.pt"), weights_only=True)
        state["layer1.0.conv1.weight"][0] = float("nan")
        torch.save(state, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(SystemExit, match=message):
        evaluate.load_encoder(str(path))
    assert not marker.exists()


def test_bad_numbers_are_usage_errors(capsys):
    for flags in (["--k", "-1"], ["--subset", "0"], ["--epochs", "0"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["anything", *flags])
        assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_encoder_of_another_architecture_is_a_clear_error(trained, image_root):
    r = main_of("test.py", trained, "--arch", "resnet50", "--data", str(image_root), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "resnet50" in r.stderr


@pytest.mark.parametrize("fraction, per_class", [(0.01, 3), (0.1, 30)])
def test_label_subset_is_class_balanced_and_fixed_by_seed(fraction, per_class):
    labels = torch.arange(10).repeat_interleave(300)[torch.randperm(3000)]
    labels[:50] = -1                                                       # unlabelled images never drawn
    keep = evaluate.balanced_subset(labels, fraction, seed=0)
    assert len(keep) == len(set(keep.tolist())) == 10 * per_class
    assert torch.bincount(labels[keep], minlength=10).tolist() == [per_class] * 10
    assert torch.equal(keep, evaluate.balanced_subset(labels, fraction, seed=0))
    assert not torch.equal(keep, evaluate.balanced_subset(labels, fraction, seed=1))


def test_semi_supervised_finetunes_a_copy_and_reports_top1_top5(image_root):
    r = evaluate.main(["--random-init", "--data", str(image_root), "--labels", "0.1", "--finetune-epochs", "2",
                       "--epochs", "1", "--device", "cpu"])
    assert r["labels"] == 0.1 and r["n_labels"] == 8                      # 2 of each of the 4 classes
    assert 0 <= r["semi_top1"] <= r["semi_top5"] <= 1


class _Corner(torch.nn.Module):
    """An "encoder" whose features are each image's top-left pixel."""
    def forward(self, x):
        return x[:, :, 0, 0]


def test_the_paper_protocol_picks_the_lr_best_on_held_out_training_images_and_retrains_on_all(monkeypatch):
    """Appendix C.1 at CIFAR scale, its trainer replaced: only lr 0.2's classifier is right, so 0.2 must win
    on the held-out tenth (one image of each class here), every run of the grid must fit the other nine
    tenths only, and the last run must fit every training image, held-out included, at 0.2."""
    labels, cpu = torch.arange(4).repeat_interleave(10), torch.device("cpu")
    images = (labels * 60).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()  # pixel = class
    centres = evaluate.features(_Corner(), images[::10], cpu)[:, :1].T                   # 1 x 4: each class's
    calls = []

    def trainer(encoder, x, y, n_classes, device, epochs, lr, augment=None, stats=None):
        calls.append((lr, x, y))                   # the right class's logit is largest at lr 0.2, the next one's else
        return lambda f: (-(f[:, :1] - centres).abs()).roll(0 if lr == 0.2 else 1, dims=1)
    monkeypatch.setattr(evaluate, "train_linear", trainer)
    _, record = evaluate.paper_protocol(_Corner(), images, labels, 4, cpu, 1, evaluate.PAPER_LRS, 0, None,
                                        evaluate.STATS["cifar10"])
    held = evaluate.balanced_subset(labels, 0.1, seed=0)
    fit = torch.ones(40, dtype=torch.bool)
    fit[held] = False
    assert record == dict(lr_grid=[0.4, 0.3, 0.2, 0.1, 0.05], held_out_top1=[0.0, 0.0, 1.0, 0.0, 0.0], lr=0.2,
                          n_held_out=4)
    assert [lr for lr, _, _ in calls] == [0.4, 0.3, 0.2, 0.1, 0.05, 0.2]
    assert all(torch.equal(x, images[fit]) and torch.equal(y, labels[fit]) for _, x, y in calls[:-1])
    assert torch.equal(calls[-1][1], images) and torch.equal(calls[-1][2], labels)


def test_the_paper_protocol_records_itself_and_trains_on_training_images_only(trained, image_root, tmp_path,
                                                                              monkeypatch):
    """The real path, end to end: every classifier is trained on training images only (never a test image),
    the last on all of them, and eval.json and the printed JSON say which protocol gave the figures."""
    from machinery import data
    run_dir, seen, real = _copy(trained, tmp_path), [], evaluate.train_linear
    monkeypatch.setattr(evaluate, "train_linear", lambda enc, x, *a, **kw: seen.append(x) or real(enc, x, *a, **kw))
    r = main_of("test.py", run_dir, *_quick(image_root), "--subset", "32", "--protocol", "paper",
                "--lr-grid", "0.2,0.1")
    assert r.returncode == 0, r.stderr
    saved = json.load(open(os.path.join(run_dir, "eval.json")))
    assert json.loads(r.stdout.strip().splitlines()[-1]) == saved and "--protocol paper: lr" in r.stdout
    assert saved["protocol"] == "paper" and saved["augment"] is True and saved["lr_grid"] == [0.2, 0.1]
    assert saved["n_held_out"] == 4 and len(saved["held_out_top1"]) == 2 and saved["lr"] in (0.2, 0.1)
    assert [len(x) for x in seen] == [28, 28, 32]
    train_x, _ = data.load(str(image_root), "cifar10", "train", 32, 32, 0, str(tmp_path / "cache"))
    assert {bytes(i.cpu().numpy()) for x in seen for i in x} == {bytes(i.numpy()) for i in train_x}


def test_the_frozen_encoder_check_covers_the_paper_protocol(trained, image_root, tmp_path, monkeypatch):
    """A classifier's training that moved the encoder's BN statistics is caught, under --protocol paper too."""
    def mover(encoder, *args, **kw):
        encoder.bn1.running_mean += 1
        return lambda f: f[:, :4]
    monkeypatch.setattr(evaluate, "train_linear", mover)
    with pytest.raises(AssertionError, match="frozen encoder changed"):
        evaluate.main([_copy(trained, tmp_path), *_quick(image_root), "--protocol", "paper"])


@pytest.mark.parametrize("flags", [["--protocol", "nope"], ["--lr-grid", "0.1,nan"], ["--lr-grid", "0.1,"],
                                   ["--lr-grid", "0.1,0"]])
def test_a_bad_protocol_or_lr_grid_is_a_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["anything", *flags])
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_published_figures_sit_beside_the_matching_figure_of_ours(tmp_path, capsys):
    """solo-learn's 92.58% is its online classifier: it is set beside train.py's online probe on the
    test split (the last one logged), lightly's kNN beside test.py's kNN, and the offline linear probe
    is said to have no published twin."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text(json.dumps(dict(epoch=5, probe_test_top1=0.5, knn_top1=0.4)) + "\n"
                                       + json.dumps(dict(epoch=10, probe_test_top1=0.75, knn_top1=0.6)) + "\n")
    evaluate.compare(dict(top1=0.7, knn_top1=0.65, n_train=10, n_test=5), str(run_dir))
    out = capsys.readouterr().out
    assert "10 epochs trained" in out
    online = next(line for line in out.splitlines() if "probe_test_top1" in line)
    assert "75.00%" in online and "92.58%" in online and "online" in online
    assert "65.00%" in next(line for line in out.splitlines() if "knn_top1" in line)
    assert "no published like-for-like" in next(line for line in out.splitlines() if "top1 " in line and "70.00%" in line)


# ---- what test.py survives ---------------------------------------------------------------------------

def test_links_named_like_an_eval_json_temporary_are_never_written_through(trained, image_root, tmp_path):
    """eval.json.tmp used to be written through: a link of that name (and a dangling one beside it) now
    keeps its target as it was, nothing appears outside the run folder, and eval.json is a plain file."""
    run_dir, outside = _copy(trained, tmp_path), tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    os.symlink(outside / "precious", os.path.join(run_dir, "eval.json.tmp"))
    os.symlink(outside / "made-through-a-link", os.path.join(run_dir, ".eval.json.tmp"))   # dangling
    result = evaluate.main([run_dir, *_quick(image_root)])
    assert (outside / "precious").read_text() == "keep" and os.listdir(outside) == ["precious"]
    assert all(os.path.islink(os.path.join(run_dir, name)) for name in ("eval.json.tmp", ".eval.json.tmp"))
    assert not os.path.islink(os.path.join(run_dir, "eval.json"))
    assert json.load(open(os.path.join(run_dir, "eval.json")))["top1"] == result["top1"]


def test_a_killed_evaluations_leftover_temporary_is_removed_and_nothing_else(trained, image_root, tmp_path):
    """Only what test.py itself made goes: an old .eval.json.XXXXXXXX.tmp (files.save_atomic's name) that
    a kill left. A fresh one (another test.py writing now), a link of that name, train.py's temporaries
    and a user's own .tmp file stay."""
    run_dir, hour_ago = _copy(trained, tmp_path), time.time() - 3600
    (tmp_path / "target").write_text("keep")
    names = {".eval.json.k3x9_q0a.tmp": "old", ".eval.json.q0a9x3k_.tmp": "fresh", ".eval.json.abcd1234.tmp": "link",
             ".checkpoint.pt.abcdefgh.tmp": "old", "notes.tmp": "old", ".eval.json.mine.tmp": "old"}
    for name, kind in names.items():
        path = os.path.join(run_dir, name)
        if kind == "link":
            os.symlink(tmp_path / "target", path)
        else:
            open(path, "w").write("partial")
        if kind != "fresh":
            os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
    evaluate.main([run_dir, *_quick(image_root)])
    left = set(os.listdir(run_dir))
    assert ".eval.json.k3x9_q0a.tmp" not in left and set(names) - {".eval.json.k3x9_q0a.tmp"} <= left
    assert (tmp_path / "target").read_text() == "keep"


FLOAT_FLAGS = ["--lr", "--finetune-lr", "--labels"]


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_usage_errors_for_every_float_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["anything", f"{flag}={value}"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--lr", "3e38"], ["--protocol", "paper", "--lr-grid", "3e38"],
                                   ["--labels", "0.1", "--finetune-epochs", "1", "--finetune-lr", "1e30"]])
def test_a_diverging_classifier_is_an_error_naming_its_lr_and_keeps_eval_json(trained, image_root, tmp_path, flags):
    """lr 3e38 (float32's largest is 3.4e38) makes the linear head's logits Inf; lr 1e30 makes the fine-tuned
    network's NaN. Both used to score chance and replace eval.json; now each names the flag to lower."""
    run_dir = _copy(trained, tmp_path)
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        f.write('{"top1": 0.5}')
    with pytest.raises(SystemExit, match=f"diverged.*lower {flags[-2]}"):
        evaluate.main([run_dir, *_quick(image_root), *flags])
    assert open(os.path.join(run_dir, "eval.json")).read() == '{"top1": 0.5}'


HUGE = str(10**12)
REFUSED = [(flag, value) for flag in ("--image-size", "--epochs", "--finetune-epochs", "--labels")
           for value in ("0", "-1", "nan", "inf", HUGE)] + \
          [(flag, value) for flag in ("--subset", "--test-subset", "--k") for value in ("0", "-1", "nan", "inf")] + \
          [(flag, value) for flag in ("--lr", "--finetune-lr") for value in ("0", "-1", "nan", "inf", "1e39")] + \
          [("--seed", value) for value in ("-1", "nan", "inf", str(10**30))]


@pytest.mark.parametrize("flag, value", REFUSED)
def test_every_numeric_flag_refuses_zero_negative_nan_inf_and_huge_before_any_work(flag, value, capsys):
    """A usage error naming the flag: --epochs 10**12 used to run for ever, --seed 10**30 and --lr 1e39 to
    end in a traceback, --lr inf to score chance."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(["anything", f"{flag}={value}"])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_huge_numbers_that_are_allowed_give_a_clean_result(trained, image_root, tmp_path):
    """--k beyond the bank is the whole bank; --subset beyond the set is named; --lr 10**12 on the linear
    head stays finite (it acts as a perceptron) and is scored."""
    run_dir = _copy(trained, tmp_path)
    result = evaluate.main([run_dir, *_quick(image_root), "--k", HUGE, "--lr", HUGE, "--seed", str(2**32 - 1)])
    assert 0 <= result["knn_top1"] <= 1 and 0 <= result["top1"] <= 1
    with pytest.raises(UserError, match="larger than the dataset"):
        evaluate.main([run_dir, *_quick(image_root), "--subset", HUGE])


@pytest.mark.parametrize("name", ["encoder.pt", "checkpoint.pt"])
def test_a_zero_byte_encoder_or_checkpoint_is_a_clear_error(tmp_path, name):
    """What a power cut can leave: test.py says the file is empty, on the command line, no traceback."""
    (tmp_path / name).write_bytes(b"")
    r = main_of("test.py", str(tmp_path / name), "--device", "cpu")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "empty" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("config, target", [
    (b'{"arch": "resnet18", "ima', "run"), (b'{"arch": "resnet18", "ima', "checkpoint.pt"), (b"[1, 2]", "run"),
    (b"\xff\xfe", "run"), (b'{"arch": "vgg16"}', "run"), (b'{"image_size": "32"}', "run"),
    (b'{"normalize": "mnist"}', "run")])
def test_a_truncated_or_malformed_config_is_a_clear_error(trained, tmp_path, config, target):
    """config.json cut short, not an object, not text, or naming what this project cannot build: one
    message naming config.json, through the command line, also for a run's checkpoint.pt."""
    run_dir = _copy(trained, tmp_path, "encoder.pt", *(["checkpoint.pt"] if target == "checkpoint.pt" else []))
    (tmp_path / "run" / "config.json").write_bytes(config)
    r = main_of("test.py", run_dir if target == "run" else os.path.join(run_dir, target), "--device", "cpu")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "config" in r.stderr, r.stderr[-2000:]


def test_an_unknown_device_is_a_clear_error_on_the_command_line(trained):
    r = main_of("test.py", trained, "--device", "foo")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--device 'foo'" in r.stderr, r.stderr[-2000:]


def test_a_run_with_a_checkpoint_but_no_encoder_is_evaluated_from_the_checkpoint(trained, image_root, tmp_path,
                                                                                   capsys):
    """It used to say "Train one": now the online encoder inside checkpoint.pt is evaluated, with a note,
    and it is the very encoder train.py wrote to encoder.pt."""
    run_dir = _copy(trained, tmp_path, "checkpoint.pt", "config.json")
    result = evaluate.main([run_dir, *_quick(image_root)])
    assert "note: evaluating the online encoder inside" in capsys.readouterr().out
    assert json.load(open(os.path.join(run_dir, "eval.json")))["top1"] == result["top1"]
    ours, saved = evaluate.load_encoder(run_dir)[0].state_dict(), evaluate.load_encoder(trained)[0].state_dict()
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in ours)


def test_an_encoder_older_than_its_checkpoint_is_passed_over_for_the_checkpoint(trained, tmp_path, capsys):
    """A kill between train.py's two saves leaves encoder.pt an epoch behind checkpoint.pt: the newer
    checkpoint's encoder is evaluated, and the note says why."""
    run_dir = _copy(trained, tmp_path, "checkpoint.pt", "encoder.pt", "config.json")
    stale = torch.load(os.path.join(run_dir, "encoder.pt"), weights_only=True)
    stale["conv1.weight"].zero_()
    torch.save(stale, os.path.join(run_dir, "encoder.pt"))
    then = os.path.getmtime(os.path.join(run_dir, "checkpoint.pt")) - 60
    os.utime(os.path.join(run_dir, "encoder.pt"), (then, then))
    encoder = evaluate.load_encoder(run_dir)[0]
    assert encoder.conv1.weight.abs().sum() > 0 and "written after encoder.pt" in capsys.readouterr().out


def _image_root(image_root, tmp_path, train_classes, test_classes):
    root = tmp_path / "images"
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for c in classes:
            shutil.copytree(image_root / split / c, root / split / c)
    return str(root)


def test_a_one_class_training_set_is_refused_not_scored_100_percent(trained, image_root, tmp_path):
    """It used to report 100% for any encoder. The figures would say nothing, so none is printed or saved."""
    run_dir, root = _copy(trained, tmp_path), _image_root(image_root, tmp_path, ["cat"], ["cat"])
    with pytest.raises(SystemExit, match="of one class"):
        evaluate.main([run_dir, "--data", root, "--epochs", "1", "--device", "cpu"])
    assert not os.path.exists(os.path.join(run_dir, "eval.json"))


def test_a_test_split_of_fewer_classes_is_scored_with_a_warning(trained, image_root, tmp_path, capsys):
    run_dir = _copy(trained, tmp_path)
    root = _image_root(image_root, tmp_path, ["airplane", "automobile", "cat", "ship"], ["cat"])
    result = evaluate.main([run_dir, "--data", root, "--epochs", "1", "--device", "cpu"])
    assert result["n_test"] == 8 and "cover 1 of the 4 training classes" in capsys.readouterr().err


@pytest.mark.parametrize("arg, message", [("config.json", "not its weights. Pass the run folder"),
                                          ("log.jsonl", "not its weights. Pass the run folder"),
                                          ("..", "It holds runs: pass one"), ("nowhere", "does not exist")])
def test_a_run_argument_of_another_kind_is_named_as_what_it_is(trained, tmp_path, arg, message):
    """A config.json given as the run used to be "refused ... can run code", the folder of runs "Train one"."""
    run_dir = _copy(trained, tmp_path)
    with pytest.raises(SystemExit, match=message):
        evaluate.load_encoder(os.path.normpath(os.path.join(run_dir, arg)))


def test_a_symlinked_run_folder_is_evaluated_into_its_target(trained, image_root, tmp_path):
    run_dir = _copy(trained, tmp_path)
    os.symlink(run_dir, tmp_path / "link")
    result = evaluate.main([str(tmp_path / "link"), *_quick(image_root)])
    assert json.load(open(os.path.join(run_dir, "eval.json")))["top1"] == result["top1"]


def test_a_run_whose_training_images_are_gone_asks_for_data(trained, tmp_path):
    """Without --data, the run's own folder is used; when it is gone, the message says so and names --data
    (it used to say "leave --data out", which the user had done)."""
    run_dir = _copy(trained, tmp_path)
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    json.dump(dict(cfg, data=str(tmp_path / "gone" / "train")), open(os.path.join(run_dir, "config.json"), "w"))
    with pytest.raises(SystemExit, match="was trained on .*gone.* which is not here. Pass --data"):
        evaluate.main([run_dir, "--device", "cpu"])


def test_ctrl_c_during_the_linear_probe_is_one_line_and_keeps_eval_json(trained, image_root, tmp_path):
    run_dir = _copy(trained, tmp_path)
    open(os.path.join(run_dir, "eval.json"), "w").write('{"top1": 0.5}')
    with open(tmp_path / "stderr", "w") as err:
        job = subprocess.Popen([sys.executable, "test.py", run_dir, "--data", str(image_root), "--augment",
                                "--epochs", "10000", "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=err, text=True)
        deadline = time.time() + 120
        while "linear probe" not in (tmp_path / "stderr").read_text() and time.time() < deadline:
            time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=120)
    stderr = (tmp_path / "stderr").read_text()
    assert job.returncode != 0 and "Traceback" not in stderr and "Stopped" in stderr, stderr[-2000:]
    assert open(os.path.join(run_dir, "eval.json")).read() == '{"top1": 0.5}'


def test_no_runs_folder_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "test.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "runs/" in r.stderr and "train.py" in r.stderr


def test_an_eval_json_that_cannot_be_written_still_prints_the_figures(trained, image_root, tmp_path):
    """eval.json is written last: when it cannot be (here a folder holds its name, as a read-only run folder
    would refuse it), the figures and the JSON line are printed first, then the error."""
    run_dir = _copy(trained, tmp_path)
    os.mkdir(os.path.join(run_dir, "eval.json"))
    r = main_of("test.py", run_dir, *_quick(image_root))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Could not write" in r.stderr, r.stderr[-2000:]
    assert 0 <= json.loads(r.stdout.strip().splitlines()[-1])["top1"] <= 1


class _Args:
    data, stem, batch_size, optimizer, base_lr, weight_decay, tau_base, epochs, subset, train_flags, cache_dir = \
        "data", "cifar", 8, "sgd", 0.1, 0.0, 0.99, 1, None, [], None


def test_side_by_side_refuses_a_checkpoint_whose_pickle_would_run_code(tmp_path):
    """tools/side_by_side.py used torch.load itself: a refused pickle was a traceback. It now loads
    through files.load_weights: a clear message, and the code does not run."""
    from tools import side_by_side
    marker = tmp_path / "ran"
    os.makedirs(tmp_path / "arm")
    torch.save({"epoch": _Pickled(str(marker))}, tmp_path / "arm" / "checkpoint.pt")
    with pytest.raises(SystemExit, match="refused to load"):
        side_by_side.run_ours(_Args(), 0, str(tmp_path / "arm"))
    assert not marker.exists()
    r = run("tools/side_by_side.py", "--data", "anything", "--out", str(tmp_path / "none"), "--plot", "x.png")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "results.jsonl" in r.stderr, r.stderr[-2000:]


# ---- Only what is ours, regular files only (issue 23) ------------------------------------------------

def test_a_config_whose_data_is_null_is_a_message(trained, tmp_path):
    """"data": null was a traceback: each value of config.json passes the checks of train.py's flag of its name."""
    run_dir = _copy(trained, tmp_path)
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    json.dump(dict(cfg, data=None), open(os.path.join(run_dir, "config.json"), "w"))
    r = main_of("test.py", run_dir, "--device", "cpu")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "has data None" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name", ["config.json", "encoder.pt"])
def test_a_fifo_in_the_run_folder_is_named_not_waited_on(trained, tmp_path, name):
    run_dir = _copy(trained, tmp_path)
    os.remove(os.path.join(run_dir, name))
    os.mkfifo(os.path.join(run_dir, name))
    r = main_of("test.py", run_dir, "--device", "cpu")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "FIFO" in r.stderr, r.stderr[-2000:]


def test_a_users_eval_json_beside_an_encoder_is_left_as_it_was(trained, image_root, tmp_path):
    """An encoder.pt in a folder that is no run of train.py's: eval.json is written there only when none is,
    or over one test.py wrote; a user's file of that name keeps its bytes (refused before any work)."""
    mine = tmp_path / "downloads"
    mine.mkdir()
    shutil.copy(os.path.join(trained, "encoder.pt"), mine / "encoder.pt")
    (mine / "eval.json").write_text('{"my": "own notes"}')
    r = main_of("test.py", str(mine), *_quick(image_root))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not one test.py wrote" in r.stderr, r.stderr[-2000:]
    assert (mine / "eval.json").read_text() == '{"my": "own notes"}'
    os.remove(mine / "eval.json")
    r = main_of("test.py", str(mine), *_quick(image_root))             # none there: written
    assert r.returncode == 0 and json.load(open(mine / "eval.json"))["top1"] >= 0, r.stderr[-2000:]
    evaluate.check_eval_json(str(mine))                                 # and the one it wrote may be replaced
