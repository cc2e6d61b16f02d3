"""tools/side_by_side.py: what it survives (issue 23): a bank smaller than k, a picture format matplotlib
cannot write, and a results.jsonl that is not its own."""
import json
import os

import pytest
import torch

from machinery.files import UserError
from tools import side_by_side


def test_knn_over_a_bank_smaller_than_k_votes_with_the_whole_bank():
    """--subset 100 made the per-epoch monitor's bank 100 images, and topk(200) a traceback."""
    bank, labels = torch.eye(3).repeat(2, 1), torch.tensor([0, 1, 2, 0, 1, 2])
    assert side_by_side.knn(bank, labels, torch.eye(3), torch.tensor([0, 1, 2]), k=200) == 1.0


def test_a_plot_with_an_extension_matplotlib_cannot_write_is_a_message(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(dict(arm="random-s0", seed=0, curve=[dict(epoch=0, knn_top1=0.3)]))
                                            + "\n")
    with pytest.raises(SystemExit, match=r"cannot draw a \.xyz picture"):
        side_by_side.main(["--data", "anything", "--out", str(tmp_path), "--plot", str(tmp_path / "curves.xyz")])
    side_by_side.main(["--data", "anything", "--out", str(tmp_path), "--plot", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind, said", [("a user's file", "is not the results.jsonl"), ("a hard link", "hard links"),
                                        ("a FIFO", "FIFO")])
def test_a_results_file_that_is_not_its_own_is_refused_before_any_arm_runs(tmp_path, kind, said):
    """results.jsonl was opened with open(..., "a"): through a hard link, into a user's file, or hanging on a
    FIFO, after hours of training. Now checked first, and left as it is."""
    out, path = tmp_path / "out", tmp_path / "out" / "results.jsonl"
    out.mkdir()
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a user's file":
        path.write_text("my results\n")
    else:
        (tmp_path / "elsewhere.jsonl").write_text(json.dumps(dict(arm="ours-s0", curve=[])) + "\n")
        os.link(tmp_path / "elsewhere.jsonl", path)
    before = os.stat(path).st_mtime_ns
    with pytest.raises((SystemExit, UserError), match=said):
        side_by_side.check_results(str(path))
    assert os.stat(path).st_mtime_ns == before
    os.remove(path)
    side_by_side.check_results(str(path))                   # new: made, empty, and then its own
    side_by_side.check_results(str(path))
