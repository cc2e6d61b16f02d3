"""What the log reports about the representation while BYOL trains, outside Algorithm 1: the loss, the
collapse monitor z_std, an online linear probe on detached features (DeepMind's byol_experiment.py;
solo-learn), and a check on the test split (kNN and the probe). Each sum stays on the device and is
read on the host only at log steps."""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import STATS
from machinery.evaluation import features, knn_accuracy


def z_std(z):
    """Collapse monitor (SimSiam, Chen & He 2021, Sec. 4.1): the std over the batch of each dimension
    of z / ||z||, averaged over the d dimensions. About 1/sqrt(d) (0.0625 for d = 256) when the
    projections spread over the sphere; 0 when every image maps to the same point."""
    return F.normalize(z.float(), dim=1).std(0).mean()


def probe_update(probe, optimizer, y, labels):
    """Online linear probe: one step of a linear classifier on the representation y (B x 512),
    cross-entropy on the batch's labels; images labelled -1 have none and are skipped. y is detached
    here, so no gradient can reach the encoder. Returns the numbers of correct and of labelled images
    as device tensors (no host sync)."""
    known = labels >= 0
    logits = probe(y.detach().float())                                   # B x classes
    loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / known.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return ((logits.argmax(1) == labels) & known).sum(), known.sum()


def collapse_warning(z_std_max, threshold, proj_dim, first_step, last_step):
    """The warning to print when z_std stayed below threshold at every step of a log interval, else None.
    A random network is far from collapse (z_std near 1/sqrt(d) from step 0), so there is no warm-up
    grace: one whole interval under the threshold is already a collapse."""
    if z_std_max >= threshold:
        return None
    return (f"warning: the representation is collapsing: z_std stayed below {threshold} at every step "
            f"from {first_step} to {last_step} (at most {z_std_max:.4f}; healthy is about 1/sqrt({proj_dim}) "
            f"= {1 / math.sqrt(proj_dim):.4f}). Check the target's EMA (--tau-base; the recipe's 0.99), "
            f"the learning rate (--base-lr) and the predictor (--no-predictor removes it, the paper's "
            f"Table 5 row that collapses).")


class Monitor:
    """The monitors of one run. add() after every step sums, on the device, the loss, z_std (mean and
    max over the log interval) and the online probe's hits (over the epoch), training the probe on y1;
    read() turns them into a log record. The probe is a Linear with its own SGD (momentum 0.9, a
    constant lr: solo-learn's classifier shares the backbone's schedule), so it can never move the
    encoder; it exists where there are labels, on the process that logs (master)."""

    def __init__(self, model, batches, test, cfg, device, master=True):
        self.encoder, self.batches, self.test, self.cfg, self.device = model.online.encoder, batches, test, cfg, device
        self.stats = STATS[cfg["normalize"]]
        dim, n_classes = model.online.projector[0].in_features, int(batches.labels.max()) + 1 if master else 0
        self.probe = torch.nn.Linear(dim, n_classes).to(device) if n_classes > 0 else None
        self.probe_optimizer = (torch.optim.SGD(self.probe.parameters(), lr=cfg["probe_lr"], momentum=0.9)
                                if self.probe else None)
        self.master, self.warned, self.probe_failed = master, False, False
        self.interval = torch.zeros(4, device=device)  # sum of loss, sum of z_std, max of z_std, steps
        self.hits = torch.zeros(2, device=device)      # the probe's correct and labelled images
        self.reset()

    def reset(self):
        """Starts the sums again, in place (a CUDA graph holds on to these very tensors)."""
        self.interval.zero_()
        self.hits.zero_()
        self.t = time.perf_counter()

    def add(self, loss, y1, z1, labels):
        """Sums one step's figures on the device; no Python state changes, so a CUDA graph can replay it."""
        s = z_std(z1)
        self.interval[:2] += torch.stack([loss.float(), s])
        torch.maximum(self.interval[2], s, out=self.interval[2])
        self.interval[3] += 1
        if self.probe is not None:
            self.hits += torch.stack(probe_update(self.probe, self.probe_optimizer, y1, labels))

    def read(self, step, total_steps, stopping=False):
        """The log record of the interval that ends at `step` (one host sync): images/s, the means of
        the loss and z_std, z_std's max; at an epoch's end the probe's accuracy over the epoch; and,
        every --knn-every epochs and at the last step (not when stopping early), the test-split check.
        Warns once when z_std shows a collapse. Starts the next interval."""
        (loss, s, s_max, steps), (correct, labelled) = self.interval.tolist(), self.hits.tolist()
        now, steps, per_epoch = time.perf_counter(), int(steps), self.batches.steps_per_epoch
        out = dict(images_per_s=steps * self.cfg["batch_size"] / (now - self.t), loss=loss / steps,
                   z_std=s / steps, z_std_max=s_max)
        self.interval.zero_()
        self.t = now
        if step % per_epoch == 0 or step == total_steps:                 # an epoch's end
            self.check_probe()
            if labelled and not self.probe_failed:
                out["probe_top1"] = correct / labelled
            self.hits.zero_()
            knn_every = self.cfg["knn_every"]
            if self.test and not stopping and math.isfinite(out["loss"]) and \
                    (step // per_epoch % knn_every == 0 or step == total_steps):
                out.update(self.check())
        warning = collapse_warning(s_max, self.cfg["collapse_z_std"], self.cfg["proj_dim"], step - steps + 1, step)
        if warning and self.master and not self.warned:
            tqdm.write(warning)
            self.warned = True
        return out

    def check(self):
        """The monitors on the test split, encoder in eval mode (BN running statistics): weighted kNN
        top-1 (k = 200, t = 0.1; evaluation.py) with the labelled training images in memory as the bank,
        and the online probe's top-1, the figure solo-learn publishes as "Acc@1 (online)". Puts the
        encoder back in train mode."""
        images, labels, stats = self.batches.images, self.batches.labels, self.stats
        known = labels >= 0
        bank = features(self.encoder, images[known], self.device, stats=stats)
        queries = features(self.encoder, self.test[0], self.device, stats=stats)
        out = dict(knn_top1=knn_accuracy(bank, labels[known], queries, self.test[1]))
        if self.probe is not None and not self.probe_failed:
            with torch.no_grad():
                out["probe_test_top1"] = (self.probe(queries).argmax(1) == self.test[1]).float().mean().item()
        self.encoder.train()
        return out

    def check_probe(self):
        """Once the probe's weights are NaN or Inf (an lr too high for it), its figures would be noise: say so
        once and leave them out of the log. The encoder is untouched: the probe never reaches it."""
        if self.probe is None or self.probe_failed:
            return
        if not bool(torch.stack([p.isfinite().all() for p in self.probe.parameters()]).all()):
            self.probe_failed = True
            if self.master:
                tqdm.write(f"warning: the online probe diverged (--probe-lr {self.cfg['probe_lr']:g} is too high "
                           f"for it): probe_top1 and probe_test_top1 are left out of the log from here on. "
                           f"BYOL's training is not affected; test.py evaluates the encoder afterwards.")

    def state_tensors(self):
        """What a step changes here (budget.time_trial puts it back): the probe, its optimizer, the sums."""
        return self.probe, self.probe_optimizer, self.interval, self.hits

    def state_dict(self):
        """The probe and its optimizer, as checkpoints save them (None without a probe)."""
        return dict(probe=self.probe.state_dict() if self.probe else None,
                    probe_optimizer=self.probe_optimizer.state_dict() if self.probe else None)

    def load_state_dict(self, state):
        """Restores the probe (when both have one); the sums start again."""
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
            self.probe_optimizer.load_state_dict(state["probe_optimizer"])
        self.reset()
