"""Orderings of rows (or columns) that make a matrix smooth: a greedy nearest-neighbour chain."""

from __future__ import annotations

import torch

# rows of the distance matrix computed per matmul: bounds the temporary to chunk x d floats
_CHUNK = 1024


def pairwise_sq_distances(matrix: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between all rows, (d, d) float32, computed in row chunks.

    Memory is the d x d result (64 MB for d = 4096) plus one chunk x d block; never d x d x k.
    """
    x = matrix.float()
    d = x.shape[0]
    # centre first: distances do not change and the Gram trick loses less precision
    x = x - x.mean(dim=0, keepdim=True)
    sq = (x * x).sum(dim=1)
    dist = torch.empty(d, d, dtype=torch.float32, device=x.device)
    for start in range(0, d, _CHUNK):
        stop = min(start + _CHUNK, d)
        block = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)
        dist[start:stop] = block.clamp_(min=0)
    return dist


def nearest_neighbor_order(matrix: torch.Tensor, two_ended: bool = False, refine_passes: int = 8) -> torch.Tensor:
    """A permutation of the rows of ``matrix`` (d x k) by the greedy nearest-neighbour chain.

    Start at the row farthest from the mean row, then repeatedly append the nearest unused row (squared
    Euclidean distance). With ``two_ended=True`` the chain grows at whichever end has the nearer unused
    neighbour. Then up to ``refine_passes`` passes of 2-opt shorten the chain (reverse a stretch wherever that
    lowers the summed distance between neighbours; 0 keeps the plain greedy chain). Order columns by calling it
    on ``matrix.T``. Cost: O(d^2 k) for the distances, O(d^2) per chain or pass; memory d x d float32.
    """
    if matrix.dim() != 2:
        raise ValueError(f"nearest_neighbor_order needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("nearest_neighbor_order: the matrix contains NaN or Inf")
    d = matrix.shape[0]
    if d <= 2:
        return torch.arange(d, device=matrix.device)
    x = matrix.float()
    start = int(((x - x.mean(dim=0, keepdim=True)) ** 2).sum(dim=1).argmax())
    dist = pairwise_sq_distances(x)
    order = _greedy_chain(dist.clone(), start, two_ended)
    return _two_opt(order, dist, refine_passes).to(matrix.device)


def _greedy_chain(dist: torch.Tensor, start: int, two_ended: bool) -> torch.Tensor:
    d = dist.shape[0]
    # unused rows keep their distances; used ones are pushed to infinity column by column
    dist[:, start] = float("inf")
    if not two_ended:
        order = [start]
        current = start
        for _ in range(d - 1):
            current = int(dist[current].argmin())
            dist[:, current] = float("inf")
            order.append(current)
        return torch.tensor(order, dtype=torch.long)
    head, tail = [start], []
    head_end = tail_end = start
    for _ in range(d - 1):
        head_next = int(dist[head_end].argmin())
        tail_next = int(dist[tail_end].argmin())
        if dist[tail_end, tail_next] < dist[head_end, head_next]:
            tail.append(tail_next)
            tail_end = chosen = tail_next
        else:
            head.append(head_next)
            head_end = chosen = head_next
        dist[:, chosen] = float("inf")
    # the tail grew backwards from the start
    return torch.tensor(tail[::-1] + head, dtype=torch.long)


def path_length(order: torch.Tensor, dist: torch.Tensor) -> float:
    """Summed distance between consecutive entries of ``order``."""
    return float(dist[order[:-1], order[1:]].sum())


def _two_opt(order: torch.Tensor, dist: torch.Tensor, passes: int) -> torch.Tensor:
    """First-improvement 2-opt on an open path: for each edge (i, i+1), reverse order[i+1..j] for the best j."""
    order = order.clone()
    d = order.numel()
    for _ in range(passes):
        improved = False
        for i in range(d - 2):
            a, b = order[i], order[i + 1]
            c = order[i + 2 :]  # candidate ends j of the reversed stretch
            after = torch.cat([order[i + 3 :], order.new_tensor([-1])])  # what follows each c (-1: path end)
            has_next = after >= 0
            nxt = after.clamp(min=0)
            old = dist[a, b] + torch.where(has_next, dist[c, nxt], 0.0)
            new = dist[a, c] + torch.where(has_next, dist[b, nxt], 0.0)
            gain = old - new
            best = int(gain.argmax())
            if gain[best] > 1e-9 * float(old[best]):
                j = i + 2 + best
                order[i + 1 : j + 1] = order[i + 1 : j + 1].flip(0)
                improved = True
        if not improved:
            break
    return order
