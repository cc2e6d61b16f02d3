"""evaluation.py: the weighted kNN classifier shared by train.py's monitor and test.py."""
import math

import torch
import torch.nn.functional as F

from machinery.evaluation import knn_accuracy


def test_knn_on_clusters_is_exact_and_uses_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)               # 4 classes
    train_y, test_y = torch.arange(4).repeat(25), torch.arange(4).repeat_interleave(5)
    train_f = centres[train_y] + 0.05 * torch.randn(100, 16, generator=g)
    test_f = centres[test_y] + 0.05 * torch.randn(20, 16, generator=g)
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=10, chunk=3) == 1.0
    # cosine similarity: the length of a feature does not matter
    assert knn_accuracy(train_f, train_y, 100 * test_f, test_y, k=10) == 1.0
    assert knn_accuracy(train_f, train_y, test_f, (test_y + 1) % 4, k=10) == 0.0


def test_knn_votes_are_weighted_by_similarity():
    # three far neighbours of class 0 (cos 0.5) against one identical neighbour of class 1:
    # a plain majority says 0; weights exp(sim / 0.1) give e^10 against 3 e^5, so 1
    query = torch.tensor([[1.0, 0.0]])
    far = torch.tensor([[0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)], [0.5, math.sqrt(0.75)]])
    train_f, train_y = torch.cat([far, query]), torch.tensor([0, 0, 0, 1])
    assert knn_accuracy(train_f, train_y, query, torch.tensor([1]), k=4, t=0.1) == 1.0
    assert knn_accuracy(train_f, train_y, query, torch.tensor([0]), k=4, t=100.0) == 1.0
