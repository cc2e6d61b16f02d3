"""Scoring a frozen encoder, shared by train.py's kNN monitor and test.py (Sec. 4, Appendix C.1): its features
on a set of images, and the weighted kNN classifier of the SSL literature."""
import torch
import torch.nn.functional as F

from augment import STATS, normalize
from machinery.devices import autocast


@torch.no_grad()
def features(encoder, images, device, batch_size=512, stats=STATS["cifar10"]):
    """y = f(x) for every uint8 image (N x 512 for ResNet-18): eval mode (BN running statistics),
    normalised with stats (mean, std), no augmentation. Leaves the encoder in eval mode."""
    encoder.eval()
    out = []
    for i in range(0, len(images), batch_size):
        with autocast(device):
            out.append(encoder(normalize(images[i:i + batch_size].to(device), *stats)).float())
    return torch.cat(out)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, t=0.1, chunk=1024):
    """Weighted kNN (Wu et al. 2018; k = 200 and t = 0.1 as lightly's CIFAR-10 benchmark, cifar10_benchmark.py):
    cosine similarity to the k nearest training features, each votes for its class with weight exp(sim / t).
    Returns top-1."""
    train_features = F.normalize(train_features, dim=1)
    n_classes = int(train_labels.max()) + 1
    k = min(k, len(train_features))
    correct = 0
    for i in range(0, len(test_features), chunk):
        sim = F.normalize(test_features[i:i + chunk], dim=1) @ train_features.T  # B x N
        sim, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return correct / len(test_features)
