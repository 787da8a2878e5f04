"""Memories of patch features (memory banks, class prototypes): coreset and k-means in numpy, field refits.

A graph that declares a memory (sidecar ``family_params["memory"]``, written by export from the
model's ``family_params()``) scores each patch by its distance to the nearest row of a named
initializer. The initializer is a float32 matrix ``[C+1, capacity]``: one column per memory item,
its C features and its squared norm (and, for the neighbourhood reweighting of Roth et al., ``neighbours`` more rows: the
indices of the item's nearest items, ``item_neighbours``). The squared norm rides along so the deployed nearest-item
search ``argmin_b (||b||^2 - 2 a.b)`` needs no computation on the memory alone, and the columns are laid out
as the graph's MatMul uses them: exporters fold any operation on a constant (a norm, a transpose)
into a new, unnamed constant that a rewrite of the memory would leave stale. Unused columns repeat
a real item, so the minimum distance is unchanged.

The sidecar says WHICH refit a graph needs (``family_params["memory"]["method"]``): ``coreset`` (the
greedy k-center coreset of the patches: a memory bank) or ``kmeans`` (K k-means centres of the patches:
class prototypes, e.g. for a model that attends to them). Nothing here knows which family asked.

Field onboarding (``python -m calibration fit`` on a graph with a memory):

1. the graph's ``patch_features`` output for the good images (collected with the raw outputs);
2. the memory of all their patches by the sidecar's method (``build_memory_for``) -> the new memory;
3. out-of-sample raw maps for the head fit: a memory from half A scores half B and vice versa,
   through the graph's own ``patch_features -> raw_maps`` subgraph (``GraphPart``);
4. the head is fit on those maps (``headfit.fit_head``), then memory + head constants are written
   together (``field.apply``, atomic).

torch-free: numpy (+ onnx/onnxruntime for the subgraph).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .fitting import CalibrationError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- coreset
def greedy_coreset(features: np.ndarray, n: int, projection_dim: int | None, seed: int = 0,
                   progress: bool = True) -> np.ndarray:
    """Indices of ``n`` rows of ``features`` chosen by greedy k-center (the greedy coreset of Roth et al.).

    features: float32 [P,C] patch features. Each step adds the row farthest from the rows chosen so
    far, so the coreset covers the feature space with the smallest radius greedy search finds.
    projection_dim: distances are computed on a Gaussian random projection to this many dimensions
    (Johnson-Lindenstrauss; as Roth et al. do), 0, None or >= C: on the features themselves. No default here:
    the family config and the sidecar say which (``MemorySpec``).
    Returns int64 [min(n, P)] indices, in selection order.
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise CalibrationError(f"coreset needs patch features [P,C] with P > 0, got shape {list(x.shape)}")
    p, c = x.shape
    n = int(min(n, p))
    if n < 1:
        raise CalibrationError(f"coreset size {n}: choose at least 1")
    rng = np.random.default_rng(seed)
    if projection_dim and projection_dim < c:
        # float32 throughout: numpy 2 keeps a float64 scalar's precision, so dividing by np.sqrt(...) after the cast
        # made the projection, and every distance of the search, float64 (twice the memory traffic: 2.3x slower)
        proj = (rng.standard_normal((c, projection_dim)) / np.sqrt(projection_dim)).astype(np.float32)
        x = x @ proj
    sq = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(n, np.int64)
    chosen[0] = int(rng.integers(p))
    # squared distance of every row to its nearest chosen row
    nearest = np.maximum(sq - 2.0 * (x @ x[chosen[0]]) + sq[chosen[0]], 0.0)
    for i in tqdm(range(1, n), desc="coreset", leave=False, disable=not progress or n < 500, mininterval=2.0):
        k = int(np.argmax(nearest))
        chosen[i] = k
        np.minimum(nearest, np.maximum(sq - 2.0 * (x @ x[k]) + sq[k], 0.0), out=nearest)
    return chosen


def coreset_size(n_patches: int, ratio: float, capacity: int) -> int:
    """How many rows a memory of ``capacity`` gets from ``n_patches`` at ``ratio`` (at least 1)."""
    if not 0 < ratio <= 1:
        raise CalibrationError(f"coreset ratio {ratio}: choose a fraction in (0, 1]")
    return int(max(1, min(capacity, round(ratio * n_patches))))


def memory_matrix(coreset: np.ndarray, capacity: int, neighbours: int = 0) -> np.ndarray:
    """The memory initializer: float32 [C+1+k, capacity], column j = [item j's features, its squared norm,
    the indices of its ``k = neighbours`` nearest items]; unused columns repeat item 0.

    coreset: float32 [M,C] memory items with 1 <= M <= capacity. The neighbour rows (the
    reweighting, ``item_neighbours``) hold item indices as float32 (exact below 2**24); the graph's search
    multiplies them by zero and reads them only through a gathered column."""
    m = np.asarray(coreset, np.float32)
    if m.ndim != 2 or not 1 <= len(m) <= capacity:
        raise CalibrationError(f"memory of {len(m)} rows does not fit a capacity of {capacity}; "
                               "lower the coreset ratio or re-export with a larger memory")
    if neighbours < 0:
        raise CalibrationError(f"{neighbours} neighbours: choose 0 (no reweighting) or more")
    c = m.shape[1]
    rows = np.empty((capacity, c + 1 + neighbours), np.float32)
    rows[: len(m), :c] = m
    rows[len(m):, :c] = m[0]
    rows[:, c] = np.einsum("ij,ij->i", rows[:, :c].astype(np.float64), rows[:, :c].astype(np.float64))
    if neighbours:
        nb = item_neighbours(m, neighbours)
        rows[: len(m), c + 1:] = nb
        rows[len(m):, c + 1:] = nb[0]
    return np.ascontiguousarray(rows.T)


def item_neighbours(items: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """For each memory item, the indices of its ``k`` nearest items (itself first), int64 [M, k].

    The reweighting of Roth et al. compares a test patch's distance to its nearest item m* with its distances to
    m*'s neighbourhood in the memory: an item in a sparse region (a rare normal pattern) weighs more than
    one in a crowded region. Fewer than ``k`` items: the farthest one repeats."""
    x = np.asarray(items, np.float64)
    m = len(x)
    kk = min(k, m)
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty((m, k), np.int64)
    for i in range(0, m, chunk):
        d = sq[i:i + chunk, None] - 2.0 * (x[i:i + chunk] @ x.T) + sq[None, :]
        d[np.arange(len(d)), np.arange(i, i + len(d))] = -np.inf  # itself first, whatever the rounding
        part = np.argpartition(d, kk - 1, axis=1)[:, :kk] if kk < m else np.tile(np.arange(m), (len(d), 1))
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
        near = np.take_along_axis(part, order, axis=1)
        out[i:i + chunk, :kk] = near
        out[i:i + chunk, kk:] = near[:, -1:]
    return out


def patches(features: np.ndarray) -> np.ndarray:
    """[N,C,h,w] feature maps -> [N*h*w, C] patch rows (float32)."""
    f = np.asarray(features, np.float32)
    return np.ascontiguousarray(f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1]))


def build_memory(features: np.ndarray, capacity: int, ratio: float, projection_dim: int | None,
                 seed: int = 0, progress: bool = True, neighbours: int = 0) -> tuple[np.ndarray, int]:
    """Patch feature maps [N,C,h,w] of good images -> (memory matrix [C+1+neighbours, capacity], items selected)."""
    rows = patches(features)
    n = coreset_size(len(rows), ratio, capacity)
    idx = greedy_coreset(rows, n, projection_dim, seed, progress)
    return memory_matrix(rows[idx], capacity, neighbours), n


# ----------------------------------------------------------------------------- k-means
def nearest_centre(x: np.ndarray, sq: np.ndarray, centres: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Index of each row's nearest centre and its squared distance, in row chunks (bounded memory, no [P,K]
    temporaries beyond one chunk's scores)."""
    cn = np.einsum("ij,ij->i", centres, centres)
    assign = np.empty(len(x), np.int64)
    d2min = np.empty(len(x), np.float32)
    for i in range(0, len(x), chunk):
        s = x[i:i + chunk] @ centres.T  # [n,K]
        s *= -2.0
        s += cn[None, :]  # ||c||^2 - 2 x.c: the row's own ||x||^2 does not change the argmin
        a = np.argmin(s, axis=1)
        assign[i:i + chunk] = a
        d2min[i:i + chunk] = np.maximum(s[np.arange(len(a)), a] + sq[i:i + chunk], 0.0)
    return assign, d2min


def kmeans(features: np.ndarray, k: int, iterations: int = 20, seed: int = 0, init_sample: int = 20000) -> np.ndarray:
    """K k-means centres (Lloyd, k-means++ seeding) of patch rows: float32 [min(k, P), C].

    features: float32 [P,C]. Seeding runs on a random sample of at most ``init_sample`` rows; an empty
    cluster is re-seeded at the row farthest from its centre. Deterministic for a given seed.
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise CalibrationError(f"k-means needs patch features [P,C] with P > 0, got shape {list(x.shape)}")
    if k < 1:
        raise CalibrationError(f"k-means with {k} centres: choose at least 1")
    rng = np.random.default_rng(seed)
    p = len(x)
    if p <= k:
        return x.copy()
    sq = np.einsum("ij,ij->i", x, x)
    sample = rng.choice(p, size=min(p, init_sample), replace=False)
    xs, sqs = x[sample], sq[sample]
    centres = np.empty((k, x.shape[1]), np.float32)
    first = int(rng.integers(len(xs)))
    centres[0] = xs[first]
    nearest = np.maximum(sqs - 2.0 * (xs @ centres[0]) + sqs[first], 0.0)
    for i in range(1, k):  # k-means++: next centre with probability proportional to squared distance
        tot = float(nearest.sum())
        j = int(rng.choice(len(xs), p=nearest / tot)) if tot > 0 else int(rng.integers(len(xs)))
        centres[i] = xs[j]
        np.minimum(nearest, np.maximum(sqs - 2.0 * (xs @ centres[i]) + sqs[j], 0.0), out=nearest)
    for _ in range(int(iterations)):
        assign, d2min = nearest_centre(x, sq, centres)
        counts = np.bincount(assign, minlength=k)
        filled = counts > 0
        order = np.argsort(assign, kind="stable")
        starts = np.searchsorted(assign[order], np.flatnonzero(filled))  # segment starts of the filled clusters
        new = centres.copy()
        new[filled] = (np.add.reduceat(x[order], starts, axis=0) / counts[filled, None]).astype(np.float32)
        if not filled.all():  # re-seed empty clusters at the worst-fitted rows
            far = np.argsort(-d2min)[: int((~filled).sum())]
            new[~filled] = x[far]
        if np.allclose(new, centres, atol=1e-6):
            centres = new
            break
        centres = new
    return centres


# ----------------------------------------------------------------------------- field refit
@dataclass
class MemorySpec:
    """What the sidecar says about a graph's memory (``family_params["memory"]``)."""

    initializer: str
    features_output: str
    capacity: int
    dim: int
    coreset_ratio: float = 0.1
    projection_dim: int | None = 128
    seed: int = 0
    method: str = "coreset"  # "coreset" (greedy k-center rows) or "kmeans" (k-means centres)
    iterations: int = 20  # k-means only
    neighbours: int = 0  # rows of item neighbour indices after the norm row (Roth et al.'s reweighting; 0: none)

    @classmethod
    def from_sidecar(cls, sc) -> "MemorySpec | None":
        return cls.from_family_params(sc.family_params)

    @classmethod
    def from_family_params(cls, family_params: dict | None) -> "MemorySpec | None":
        d = (family_params or {}).get("memory")
        if not d:
            return None
        try:
            spec = cls(initializer=d["initializer"], features_output=d["features_output"], capacity=int(d["capacity"]),
                       dim=int(d["dim"]), coreset_ratio=float(d.get("coreset_ratio", 0.1)),
                       projection_dim=d.get("projection_dim", 128), seed=int(d.get("seed", 0)),
                       method=str(d.get("method", "coreset")), iterations=int(d.get("iterations", 20)),
                       neighbours=int(d.get("neighbours", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"sidecar family_params.memory is malformed ({e}); re-export the model") from e
        if spec.method not in MEMORY_METHODS:
            raise CalibrationError(f"sidecar family_params.memory.method {spec.method!r} is unknown to this edgead "
                                   f"(known: {', '.join(MEMORY_METHODS)}); upgrade edgead or re-export the model")
        return spec


MEMORY_METHODS = ("coreset", "kmeans")
MIN_IMAGES = 4  # below this a refit is refused
FEW_IMAGES = 10  # below this: a warning
RECOMMENDED_IMAGES = (50, 100)


def build_memory_for(spec: MemorySpec, features: np.ndarray, progress: bool = True) -> tuple[np.ndarray, int]:
    """Patch feature maps [N,C,h,w] -> (memory matrix [C+1, capacity], items) by the sidecar's method."""
    if spec.method == "kmeans":
        centres = kmeans(patches(features), spec.capacity, spec.iterations, spec.seed)
        return memory_matrix(centres, spec.capacity, spec.neighbours), len(centres)
    return build_memory(features, spec.capacity, spec.coreset_ratio, spec.projection_dim, spec.seed, progress,
                        spec.neighbours)


def image_count_advice(n: int) -> str | None:
    """One line about whether ``n`` good images are enough for a memory refit (None: enough)."""
    lo, hi = RECOMMENDED_IMAGES
    if n < FEW_IMAGES:
        return (f"only {n} good images: the new memory may miss normal variation and raise false alarms; "
                f"{lo}-{hi} good images covering the usual variation are recommended")
    if n < lo:
        return f"{n} good images: usable; {lo}-{hi} recommended (covering the usual variation) for steadier thresholds"
    return None


def extra_raw_outputs(sc) -> list[str]:
    """Raw outputs field calibration must collect beyond raw_maps/features (none without a memory)."""
    spec = MemorySpec.from_sidecar(sc)
    return [] if spec is None else [spec.features_output]


@dataclass
class MemoryFit:
    constants: dict[str, np.ndarray]  # {initializer: memory matrix [C+1, capacity]}
    heldout_raw_maps: np.ndarray  # [N,1,h,w]: each image scored by the memory of the other half
    deployed_raw_maps: np.ndarray | None  # [N,1,h,w]: scored by the memory written (what the deployed graph gives)
    info: dict = field(default_factory=dict)


class MemoryScorer:
    """patch features -> raw maps with a candidate memory, through the graph's own subgraph."""

    def __init__(self, onnx_path: str | Path, spec: MemorySpec):
        from .graph_part import GraphPart

        self.spec = spec
        self.part = GraphPart(onnx_path, inputs=[spec.features_output], outputs=["raw_maps"])
        if spec.initializer not in self.part.initializers:
            raise CalibrationError(f"{onnx_path}: raw maps do not use the memory initializer {spec.initializer!r}; "
                                   "re-export the model")

    def __call__(self, memory: np.ndarray, features: np.ndarray, batch: int = 4) -> np.ndarray:
        return self.part.run({self.spec.initializer: memory}, {self.spec.features_output: features}, batch)["raw_maps"]


def fit_memory(onnx_path: str | Path, sc, features: np.ndarray, seed: int = 0) -> MemoryFit:
    """New memory from good images' patch features [N,C,h,w], with out-of-sample raw maps for the head fit,
    scored through the deployed graph's own ``patch_features -> raw_maps`` subgraph."""
    spec = MemorySpec.from_sidecar(sc)
    if spec is None:
        raise CalibrationError("this model has no memory to refit")
    return fit_memory_with(spec, MemoryScorer(onnx_path, spec), features, seed)


def fit_memory_with(spec: MemorySpec, scorer, features: np.ndarray, seed: int = 0, deployed: bool = True) -> MemoryFit:
    """The memory refit with any ``scorer(memory [C+1,M], features [N,C,h,w], batch) -> raw maps``: the graph's
    subgraph in the field, the torch model's own search in training (its first calibration then sees the
    same out-of-sample maps a field refit would). ``deployed=False``: skip scoring the images with the final
    memory (``deployed_raw_maps`` None; training does not report those scores)."""
    f = np.asarray(features, np.float32)
    if f.ndim != 4 or f.shape[1] != spec.dim:
        raise CalibrationError(f"patch features of shape {list(f.shape)}, the memory holds {spec.dim} channels; "
                               "re-export the model")
    if len(f) < MIN_IMAGES:
        raise CalibrationError(f"{len(f)} good images: a memory refit needs at least {MIN_IMAGES} "
                               f"({RECOMMENDED_IMAGES[0]}-{RECOMMENDED_IMAGES[1]} recommended)")
    advice = image_count_advice(len(f))
    if advice:
        (log.warning if len(f) < FEW_IMAGES else log.info)(advice)
    idx = np.random.default_rng(seed).permutation(len(f))
    halves = (idx[: len(f) // 2], idx[len(f) // 2:])
    heldout = None
    for own, other in (halves, halves[::-1]):
        mem, _ = build_memory_for(spec, f[own])
        maps = scorer(mem, f[other], 4)
        if heldout is None:
            heldout = np.empty((len(f),) + maps.shape[1:], np.float32)
        heldout[other] = maps
    memory, n = build_memory_for(spec, f)
    # one image at a time, as a batch-1 graph runs on the line: GEMM rounding depends on the batch
    deployed_maps = scorer(memory, f, 1) if deployed else None
    info = {"method": spec.method, "rows": n, "capacity": spec.capacity,
            "patches": int(f.shape[0] * f.shape[2] * f.shape[3]), "n_images": int(len(f))}
    if spec.method == "coreset":
        info["coreset_ratio"] = spec.coreset_ratio
    if advice:
        info["advice"] = advice
    log.info("memory (%s): %d rows from %d patches (capacity %d)", spec.method, n, info["patches"], spec.capacity)
    return MemoryFit({spec.initializer: memory}, heldout, deployed_maps, info)
