# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Neuron partitions of a dense SwiGLU FFN, and the k-means used for partitions and router initialisation.

A SwiGLU FFN is a sum over its I intermediate neurons, f(x) = sum_j w_down[:, j] act(g_j . x) (u_j . x), so any
partition of the neurons into G shards of width I/G gives f = sum of the shard FFNs, exactly (only the order of
the summation changes). A partition is a LongTensor [G, I/G] of neuron ids; shard s holds the neurons in row s.

- `contiguous`: shard s = neurons s*I/G .. (s+1)*I/G - 1 (Megatron's and OLMo-core's split).
- `random`: a seeded random permutation cut into G shards (LLaMA-MoE's RandomSplit).
- `clustered`: balanced k-means over the neurons' activation profiles |act(g_j . x_t) (u_j . x_t)| on calibration
  tokens, so neurons that fire together land in the same expert (MoEfication's co-activation idea, with LLaMA-MoE's
  size-constrained k-means instead of METIS). Shards are ordered by mean activation, most active first, so the first
  shards (the ones that become shared experts) hold the neurons used by most tokens, as DeepSeekMoE intends for its
  shared experts.

`kmeans` (spherical, seeded k-means++ init) also gives the router initialisation from the router's real inputs.
"""

import torch

PARTITIONS = ("contiguous", "random", "clustered", "shuffled")


def contiguous_partition(width: int, shards: int) -> torch.Tensor:
    """[shards, width // shards]: consecutive neuron ids."""
    return torch.arange(width).reshape(shards, width // shards)


def random_partition(width: int, shards: int, generator: torch.Generator) -> torch.Tensor:
    """[shards, width // shards]: a random permutation cut into equal shards (ids sorted within each shard)."""
    return torch.randperm(width, generator=generator).reshape(shards, width // shards).sort(dim=1).values


def _normalize_rows(points: torch.Tensor) -> torch.Tensor:
    return points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _kmeans_plus_plus(points: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors (distance 1 - cosine)."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    centroids = [points[first]]
    distance = (1 - points @ points[first]).clamp_min(0)
    for _ in range(1, clusters):
        if distance.sum() <= 0:  # fewer distinct points than clusters: any point will do
            index = int(torch.randint(points.shape[0], (1,), generator=generator))
        else:
            index = int(torch.multinomial(distance, 1, generator=generator))
        centroids.append(points[index])
        distance = torch.minimum(distance, (1 - points @ points[index]).clamp_min(0))
    return torch.stack(centroids)


def _balanced_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """Labels [N] giving every cluster exactly N / K points: greedy over (point, cluster) pairs, most similar first."""
    num_points, num_clusters = similarity.shape
    capacity = [num_points // num_clusters] * num_clusters
    labels = [-1] * num_points
    remaining = num_points
    for flat in torch.argsort(similarity.flatten(), descending=True, stable=True).tolist():
        point, cluster = divmod(flat, num_clusters)
        if labels[point] < 0 and capacity[cluster] > 0:
            labels[point] = cluster
            capacity[cluster] -= 1
            remaining -= 1
            if remaining == 0:
                break
    return torch.tensor(labels)


def kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator, iterations: int = 25,
           balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of the rows of `points` [N, D] -> (unit centroids [K, D], labels [N]).

    `balanced=True` constrains every cluster to exactly N / K points (N must be a multiple of K). Deterministic for
    a given generator state.
    """
    points = _normalize_rows(points.float())
    if points.shape[0] < clusters:
        raise ValueError(f"k-means needs at least {clusters} points, got {points.shape[0]}")
    centroids = _kmeans_plus_plus(points, clusters, generator)
    labels = None
    for _ in range(iterations):
        similarity = points @ centroids.T  # [N, K]
        new_labels = _balanced_assignment(similarity) if balanced else similarity.argmax(dim=1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=clusters)
        empty = counts == 0
        if empty.any():  # reseed an empty cluster with the point worst served by its centroid
            worst = (points * centroids[labels]).sum(dim=1).argsort()[: int(empty.sum())]
            sums[empty] = points[worst]
        centroids = _normalize_rows(sums)
    return centroids, labels


def clustered_partition(profiles: torch.Tensor, shards: int, generator: torch.Generator) -> torch.Tensor:
    """[shards, I // shards] from balanced k-means over neuron activation profiles [I, N]; shards are ordered by
    their mean activation, most active first, and ids are sorted within each shard."""
    _, labels = kmeans(profiles, shards, generator, balanced=True)
    strength = torch.zeros(shards).index_add_(0, labels, profiles.mean(dim=1).float())
    order = torch.argsort(strength, descending=True, stable=True)
    return torch.stack([torch.nonzero(labels == cluster).flatten() for cluster in order.tolist()])
