"""Edge-to-edge surface distances of two masks, as MONAI's surface metrics compute them, in half the time.

MONAI's ``compute_surface_dice`` and ``compute_hausdorff_distance`` (edge voxels, Euclidean distances) both rest on
``monai.metrics.utils.get_edge_surface_distance``: the *edges* of a mask are its voxels that are not in its erosion
by the face-connected cross (``scipy.ndimage.binary_erosion``, outside the array counting as background), and each
edge voxel of one mask gets the distance in mm to the nearest edge voxel of the other (a KD-tree over the scaled
voxel coordinates, distances returned as float32). :func:`edge_distances` gives the same values, bit for bit
(``tests/test_surface_distances.py`` compares them with MONAI's), with less work:

* the edges come from six shifted ``&`` of the mask instead of a generic erosion, and the voxel coordinates from
  one flat index pass;
* an edge voxel that is an edge voxel of the other mask too is at distance 0 (the nearest point is itself), so only
  the others are looked up in the tree; a prediction that follows the truth shares much of its surface with it;
* the tree is built without the balancing pass (the nearest neighbour, hence the distance, is the same) and queried
  with ``workers`` threads (default: ``torch.get_num_threads()``; one for fewer than ``PARALLEL_MIN_POINTS``
  lookups).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["edge_distances", "mask_edges"]

#: points per leaf of the KD-tree (MONAI's choice for one batched query)
LEAF_SIZE = 32
#: fewer lookups than this run on one thread (starting threads costs more than they save)
PARALLEL_MIN_POINTS = 1 << 12


def _spacing_arg(spacing: float | Sequence[float] | None, ndim: int) -> float | list[float] | None:
    """``spacing`` as the surface metrics take it: None, one number (isotropic), or one value per mask axis
    (checked)."""
    if spacing is None or isinstance(spacing, (int, float)):
        return spacing
    values = [float(s) for s in np.asarray(spacing, dtype=float).ravel()]
    if len(values) != ndim:
        raise ValueError(f"spacing needs one value per mask axis ({ndim}), got {len(values)}: {values}")
    return values


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """(...) bool -> (...) bool: the voxels of ``mask`` with at least one face neighbour outside it (or on the
    array's border), i.e. ``mask ^ binary_erosion(mask)`` with scipy's default cross and ``border_value=0``."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    interior = mask.copy()
    everything = [slice(None)] * mask.ndim
    for axis in range(mask.ndim):
        later, earlier = list(everything), list(everything)
        later[axis], earlier[axis] = slice(1, None), slice(None, -1)
        interior[tuple(later)] &= mask[tuple(earlier)]
        interior[tuple(earlier)] &= mask[tuple(later)]
        for border in (0, -1):
            face = list(everything)
            face[axis] = border
            interior[tuple(face)] = False
    return mask & ~interior


def _voxels(edges: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat indices (N,) of the ``edges`` voxels, in C order (``np.argwhere``'s), and their coordinates (N, D)
    in mm."""
    flat = np.flatnonzero(edges)
    coordinates = np.empty((flat.size, edges.ndim), dtype=np.float64)
    rest = flat
    for axis in range(edges.ndim - 1, 0, -1):
        rest, coordinates[:, axis] = np.divmod(rest, edges.shape[axis])
    coordinates[:, 0] = rest
    return flat, coordinates * scale


def _nearest(points: np.ndarray, flat: np.ndarray, other_edges: np.ndarray, other_points: np.ndarray,
             workers: int) -> torch.Tensor:
    """(N,) float32: the distance from each of ``points`` (voxels ``flat``) to the nearest of ``other_points`` (the
    voxels of ``other_edges``): 0 for a voxel of ``other_edges`` itself, a KD-tree lookup for the rest."""
    from scipy.spatial import KDTree

    distances = np.zeros(flat.size, dtype=np.float64)
    away = ~other_edges.reshape(-1)[flat]
    if away.any():
        tree = KDTree(other_points, leafsize=LEAF_SIZE, balanced_tree=False, compact_nodes=False)
        queries = points[away]
        distances[away] = tree.query(queries, k=1, workers=workers if len(queries) >= PARALLEL_MIN_POINTS else 1)[0]
    return torch.from_numpy(distances.astype(np.float32))


def edge_distances(pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
                   spacing: float | Sequence[float] | None = None, workers: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The surface distances of two non-empty bool masks of one shape (2D or 3D), in mm.

    Args:
        pred, truth: the masks (CPU tensors or arrays), each with at least one voxel set.
        spacing: voxel size per axis in the masks' axis order, one number (isotropic) or None (1: voxels).
        workers: threads of the KD-tree lookup (None: ``torch.get_num_threads()``).

    Returns:
        float32 ``(to_truth, to_pred)``: for each edge voxel of ``pred`` (C order) the distance to the nearest edge
        voxel of ``truth``, and the reverse -- MONAI's ``get_edge_surface_distance(pred, truth, "euclidean", spacing,
        symmetric=True)[1]``.
    """
    p, t = (np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=bool)
            for x in (pred, truth))
    if p.shape != t.shape:
        raise ValueError(f"pred and truth must have the same shape, got {p.shape} and {t.shape}")
    if not (p.any() and t.any()):
        raise ValueError("edge distances need two non-empty masks (a missing surface has no distance)")
    spacing = _spacing_arg(spacing, p.ndim)
    scale = np.broadcast_to(np.asarray(1.0 if spacing is None else spacing, dtype=np.float64), (p.ndim,))
    workers = int(workers if workers is not None else torch.get_num_threads())
    edges_p, edges_t = mask_edges(p), mask_edges(t)
    (flat_p, points_p), (flat_t, points_t) = _voxels(edges_p, scale), _voxels(edges_t, scale)
    return (_nearest(points_p, flat_p, edges_t, points_t, workers),
            _nearest(points_t, flat_t, edges_p, points_p, workers))
