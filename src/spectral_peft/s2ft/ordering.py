"""Orderings of rows (or columns) that make a matrix smooth: a greedy nearest-neighbour chain."""

from __future__ import annotations

import torch

# rows of the distance matrix computed per matmul: bounds the temporary to chunk x d floats
_CHUNK = 1024


def pairwise_sq_distances(matrix: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between all rows, (d, d) float32, computed in row chunks.

    Memory is the d x d result (64 MB for d = 4096) plus one centred copy of the input and one chunk x d block;
    never d x d x k.
    """
    # centring changes no distance and the Gram trick loses less precision
    x = matrix.float() - matrix.float().mean(dim=0, keepdim=True)
    d = x.shape[0]
    sq = (x * x).sum(dim=1)
    dist = torch.empty(d, d, dtype=torch.float32, device=x.device)
    for start in range(0, d, _CHUNK):
        stop = min(start + _CHUNK, d)
        torch.addmm(sq[start:stop, None] + sq[None, :], x[start:stop], x.T, alpha=-2.0, out=dist[start:stop])
    return dist.clamp_(min=0)


def nearest_neighbor_orders(matrix: torch.Tensor, refine_passes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and the column order of ``matrix`` by :func:`nearest_neighbor_order`."""
    return (nearest_neighbor_order(matrix, refine_passes=refine_passes),
            nearest_neighbor_order(matrix.T, refine_passes=refine_passes))


def nearest_neighbor_order(matrix: torch.Tensor, two_ended: bool = False, refine_passes: int = 3) -> torch.Tensor:
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
    dist = pairwise_sq_distances(matrix)
    # the row farthest from the mean: ||x_i - mean||^2 = mean of its distances to all rows minus a constant
    start = int(dist.mean(dim=1).argmax())
    order = _greedy_chain(dist, start, two_ended)
    return _two_opt(order, dist, refine_passes).to(matrix.device)


def _greedy_chain(dist: torch.Tensor, start: int, two_ended: bool) -> torch.Tensor:
    d = dist.shape[0]
    # used rows are pushed to infinity through a penalty added to each looked-up row; dist stays intact
    used = torch.zeros(d, dtype=dist.dtype, device=dist.device)
    used[start] = float("inf")

    def nearest(row: int) -> tuple[int, float]:
        candidates = dist[row] + used
        best = int(candidates.argmin())
        return best, float(candidates[best])

    if not two_ended:
        order = [start]
        current = start
        for _ in range(d - 1):
            current, _ = nearest(current)
            used[current] = float("inf")
            order.append(current)
        return torch.tensor(order, dtype=torch.long)
    head, tail = [start], []
    head_end = tail_end = start
    for _ in range(d - 1):
        head_next, head_dist = nearest(head_end)
        tail_next, tail_dist = nearest(tail_end)
        if tail_dist < head_dist:
            tail.append(tail_next)
            tail_end = chosen = tail_next
        else:
            head.append(head_next)
            head_end = chosen = head_next
        used[chosen] = float("inf")
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
