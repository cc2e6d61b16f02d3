"""torchrun: several processes train as one does over the same global batch (DDP and BN over the global
batch), every process ends on the same weights, and only rank 0 writes; a run resumes."""
import json
import os
import sys

import torch
import torch.multiprocessing as mp

from optim import make_optimizer
from train import DEFAULTS, byol_update
from machinery.batches import epoch_order
from machinery.devices import prepare
from tests.conftest import ROOT, TINY, small_byol

STEPS, BATCH = 3, 8


def _train(rank, world, init_file, out):
    """STEPS of Algorithm 1 on fixed global batches, each process on its share; saves its weights."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model = small_byol().double()  # the same initial weights in every process; float64, as float32's rounding
    # alone moves the first layers' gradients by 0.2% in this tiny deep network
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                             world_size=world)
    forward = prepare(model, device, distributed=world > 1)  # BN over the global batch, and DDP
    optimizer = make_optimizer(model, dict(DEFAULTS))  # the recipe's LARS
    g, share = torch.Generator().manual_seed(1), BATCH // world
    for _ in range(STEPS):
        view1, view2 = (torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
        mine = slice(rank * share, (rank + 1) * share)
        byol_update(model, forward, optimizer, view1[mine], view2[mine], lr=0.5, tau=0.99)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}-of-{world}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


def test_two_processes_train_as_one_over_the_global_batch(tmp_path):
    """Online, predictor and target weights and BN statistics: identical in both processes, and equal
    (to float tolerance) to one process that takes the whole global batch with plain BN."""
    mp.spawn(_train, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    _train(0, 1, None, str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}-of-2.pt") for r in (0, 1))
    one = torch.load(tmp_path / "rank0-of-1.pt")
    assert a.keys() == b.keys() == one.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the processes"
        assert torch.allclose(a[k], one[k], rtol=1e-9, atol=1e-12), f"{k}: 2 processes != 1"
    start = small_byol().double().state_dict()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], start[k])]
    assert any(k.startswith("target.") for k in moved) and any(k.startswith("predictor.") for k in moved)


def _torchrun(*args):
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_epoch_order_is_shared_and_changes_every_epoch():
    a, b = epoch_order(100, 0, 3, "cpu"), epoch_order(100, 0, 3, "cpu")
    assert torch.equal(a, b) and torch.equal(a.sort().values, torch.arange(100))
    assert not torch.equal(a, epoch_order(100, 0, 4, "cpu"))
    assert not torch.equal(a, epoch_order(100, 1, 3, "cpu"))


def test_torchrun_writes_once_and_sigterm_stops_every_process_at_one_step_with_one_checkpoint(image_root, tmp_path):
    """SIGTERM to torchrun (a cluster's preemption) reaches both processes; they agree at the next log
    step, rank 0 saves one checkpoint there and says so once, and the run resumes from it. Rank 0 alone
    writes: one "Done", one log line per log step, the kNN check in the log (one torchrun run serves both
    checks: each start costs seconds)."""
    import signal
    import subprocess
    import time
    out = tmp_path / "run"
    flags = [a for a in TINY if a not in ("--batch-size", "8")] + ["--batch-size", "16"]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "train.py", "--data", str(image_root / "train"), "--subset", "32", "--epochs", "500",
                            "--knn-every", "1", "--out", str(out), *flags], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text().strip():
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-2000:]
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    assert (stdout + stderr).count("Stopped by SIGTERM") == 1, stderr[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 1000 and step % 2 == 0                                   # a log step (--log-every 2)
    r = _torchrun("--resume", str(out), "--epochs", str(step // 2 + 1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("Done in") == 1                                     # rank 0 alone prints
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == (step // 2 + 1) * 2
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [x["step"] for x in log] == list(range(2, (step // 2 + 1) * 2 + 1, 2))   # 32 images, global batch 16
    assert "knn_top1" in log[-1]                                               # the kNN check at the end
