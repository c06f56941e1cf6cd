"""Procedural brain anatomy for the synthetic data generator (no downloads, numpy and scipy only).

Two renderers live here, both pure functions of a ``numpy.random.Generator``:

* :func:`brats_case` builds one skull-stripped multi-modal volume (FLAIR, T1, T1ce, T2) with a glioma and its
  BraTS label map (1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour).
* :func:`kaggle_slice` builds one 2D head slice with skull and scalp, in the look of the Kaggle Brain Tumor MRI
  images, with or without a glioma, meningioma or pituitary lesion.

Geometry is expressed in coordinates normalised to the brain (or head) radii, so the same anatomy scales to any
volume shape or image size. Smooth random fields are interpolated from a coarse grid of control values with
separable matrix products, which keeps a 240x240x155 case to a second or two of CPU time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

MODALITIES = ("flair", "t1", "t1ce", "t2")

# BraTS 2017-2021 label values; other layouts remap them when writing.
NECROTIC_CORE, EDEMA, ENHANCING = 1, 2, 4

# Tissue codes of the internal class map. Tumour compartments come last so that they overwrite normal tissue.
BACKGROUND, CSF, GREY, WHITE, DEEP_GREY, WM_LESION, PERIVENTRICULAR, CHOROID = 0, 1, 2, 3, 4, 5, 6, 7
TUMOUR_EDEMA, TUMOUR_ENHANCING, TUMOUR_NECROSIS, TUMOUR_SOLID = 8, 9, 10, 11
N_TISSUES = 12

# Intensity of each tissue relative to white matter, per modality (index = tissue code). FLAIR: CSF dark, edema
# bright, but unlabelled white-matter lesions and the cortex are bright too, so intensity alone is not a label.
# T1ce: enhancing rim and choroid plexus bright. T2: fluid brightest.
_TISSUE_CONTRAST = {
    #          bg   csf   gm    wm   dgm   wml   pv   chp    ed    et   nec   net
    "flair": (0.0, 0.30, 1.22, 1.00, 1.12, 1.48, 1.15, 0.80, 1.65, 1.45, 0.95, 1.45),
    "t1": (0.0, 0.30, 0.72, 1.00, 0.80, 0.82, 0.90, 0.55, 0.72, 0.85, 0.40, 0.66),
    "t1ce": (0.0, 0.30, 0.74, 1.00, 0.82, 0.84, 0.90, 1.40, 0.74, 1.60, 0.40, 0.70),
    "t2": (0.0, 2.40, 1.35, 1.00, 1.20, 1.65, 1.30, 1.80, 1.85, 1.50, 2.30, 1.70),
}

# Raw scanner-like white-matter level per modality (uniform range): BraTS volumes are not normalised and their
# scale differs between modalities and cases.
_WHITE_MATTER_LEVEL = {"flair": (160.0, 400.0), "t1": (450.0, 1050.0), "t1ce": (400.0, 1100.0), "t2": (220.0, 850.0)}


# --------------------------------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------------------------------
def _interpolation_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """Row-normalised Gaussian weights that spread ``n_ctrl`` control values over ``n_out`` samples."""
    if n_ctrl == 1:
        return np.ones((n_out, 1), dtype=np.float32)
    ctrl = np.linspace(-0.5, n_out - 0.5, n_ctrl)
    spacing = ctrl[1] - ctrl[0]
    x = np.arange(n_out)[:, None]
    weights = np.exp(-0.5 * ((x - ctrl[None, :]) / spacing) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: float | tuple[float, ...]) -> np.ndarray:
    """Zero-mean, unit-variance random field whose features are about ``spacing`` samples wide.

    Args:
        rng: source of randomness.
        shape: output shape (2D or 3D).
        spacing: distance between control values, in samples, for all axes or per axis.

    Returns:
        float32 array of ``shape``.
    """
    spacings = (spacing,) * len(shape) if np.isscalar(spacing) else tuple(spacing)  # type: ignore[arg-type]
    n_ctrl = [max(2, round(n / max(s, 1.0)) + 2) for n, s in zip(shape, spacings, strict=True)]
    coarse = rng.standard_normal(n_ctrl).astype(np.float32)
    # Separable interpolation: one small matrix product per axis instead of a large convolution.
    matrices = [_interpolation_matrix(n_out, n_in) for n_out, n_in in zip(shape, n_ctrl, strict=True)]
    if len(shape) == 2:
        out = matrices[0] @ coarse @ matrices[1].T
    elif len(shape) == 3:
        out = np.tensordot(matrices[0], coarse, axes=(1, 0))
        out = np.matmul(matrices[1], out) @ matrices[2].T
    else:
        raise ValueError(f"smooth_field supports 2D and 3D shapes, not {shape}")
    out -= out.mean()
    out /= out.std() + 1e-6
    return np.ascontiguousarray(out, dtype=np.float32)


def _rotation_matrix(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# --------------------------------------------------------------------------------------------------------------
# BraTS-like volumes
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TumourPlan:
    """What a case's tumour should look like, decided before any voxel is drawn."""

    kind: str  # "necrotic" (enhancing rim around necrosis), "solid" (enhancing, no necrosis), "non_enhancing"
    small: bool
    edge: bool
    multifocal: bool


@dataclass
class BrainGeometry:
    """Brain ellipsoid in voxel space and the bounding box in which anatomy is computed."""

    centre: np.ndarray  # voxel coordinates of the brain centre
    radii: np.ndarray  # semi-axes in voxels (left-right, anterior-posterior, inferior-superior)
    box: tuple[slice, slice, slice]
    grid: tuple[np.ndarray, np.ndarray, np.ndarray] = field(repr=False)  # normalised (u, v, w) in the box


def tumour_plan_for_case(index: int, rng: np.random.Generator) -> TumourPlan:
    """Spread small, edge and multifocal tumours over the case indices (any 4+ cases hold a small and an edge one)."""
    small = index % 6 == 1
    edge = index % 4 == 2 or (index % 4 == 3 and rng.random() < 0.3)
    kind = ("necrotic", "solid", "necrotic", "non_enhancing")[index % 4] if not small else "solid"
    if index % 8 == 7:
        kind = "necrotic"
    return TumourPlan(kind=kind, small=small, edge=edge, multifocal=index % 6 == 5)


def brain_geometry(shape: tuple[int, int, int], rng: np.random.Generator) -> BrainGeometry:
    """Place a brain-sized ellipsoid the way BraTS (SRI24 space) places it: centred, a little low in z."""
    dims = np.asarray(shape, dtype=float)
    scale = rng.uniform(0.93, 1.05)
    radii = dims * np.array([0.285, 0.355, 0.41]) * scale * rng.uniform(0.97, 1.03, size=3)
    centre = dims * np.array([0.5, 0.49, 0.465]) + rng.normal(0.0, 0.012, size=3) * dims
    lo = np.maximum(np.floor(centre - radii * 1.12) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(centre + radii * 1.12) + 2, dims).astype(int)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    axes = [(np.arange(a, b, dtype=np.float32) - c) / r for a, b, c, r in zip(lo, hi, centre, radii, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    return BrainGeometry(centre=centre, radii=radii, box=box, grid=tuple(grid))  # type: ignore[arg-type]


def _window(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray], centre: Any, half_extent: Any
) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Index window of a sparse normalised grid around ``centre``, and the grid restricted to it.

    Structures smaller than the brain are computed in their window only, which saves most of the CPU time.
    """
    slices = []
    for coords, c, h in zip(grid, centre, half_extent, strict=True):
        idx = np.nonzero(np.abs(coords.reshape(-1) - c) <= h)[0]
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0))
    sel = (slices[0], slices[1], slices[2])
    return sel, (grid[0][sel[0], :, :], grid[1][:, sel[1], :], grid[2][:, :, sel[2]])


def brain_tissue(geom: BrainGeometry, rng: np.random.Generator, voxel_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue class map of a healthy brain inside ``geom.box`` and the depth below the brain surface.

    Args:
        geom: brain placement.
        rng: source of randomness.
        voxel_scale: voxels per millimetre of a full-size (240x240x155) brain; small volumes get coarser anatomy.

    Returns:
        ``(tissue, depth)``: uint8 tissue codes and float32 depth in normalised radius units (0 at the surface).
    """
    u, v, w = geom.grid
    box_shape = tuple(s.stop - s.start for s in geom.box)
    mean_radius = float(np.mean(geom.radii))

    # Egg-shaped, flatter at the base, with slow lobar bulges.
    w_eff = np.where(w < 0, w * 1.18, w)
    u_eff = u / (1.0 + 0.07 * v)
    radius = np.sqrt(u_eff**2 + v**2 + w_eff**2)
    radius = radius * (1.0 + 0.045 * smooth_field(rng, box_shape, 28 * voxel_scale))
    depth = (1.0 - radius).astype(np.float32)
    brain = depth > 0

    tissue = np.zeros(box_shape, dtype=np.uint8)
    tissue[brain] = WHITE

    # Cortex: a ribbon whose inner boundary wanders, thicker in the inferior (cerebellum-like) part.
    ribbon = 0.085 + 0.045 * smooth_field(rng, box_shape, 9 * voxel_scale) + 0.09 * _smoothstep((-w - 0.45) / 0.3)
    tissue[brain & (depth < np.maximum(ribbon, 1.5 / mean_radius))] = GREY

    # Sulci: thin sheets of CSF along the zero set of a random field, reaching in from the surface.
    sulcal = smooth_field(rng, box_shape, 5 * voxel_scale)
    sulci = brain & (np.abs(sulcal) < 0.13) & (depth < ribbon * 1.6)
    tissue[sulci | (brain & (depth < 1.2 / mean_radius))] = CSF

    # Interhemispheric fissure, bending a little; the corpus callosum interrupts it in the middle.
    midline = u * geom.radii[0] - 1.5 * np.sin(2.0 * v + rng.uniform(0, np.pi))
    fissure_level = (w > 0.4) | ((w > -0.25) & (np.abs(v) > 0.35))
    tissue[brain & (np.abs(midline) < 1.1 * max(voxel_scale, 0.6)) & fissure_level] = CSF

    # Central structures only need the central part of the box.
    sel, (cu, cv, cw) = _window(geom.grid, (0.0, 0.0, 0.05), (0.45, 0.62, 0.35))
    centre_tissue = tissue[sel]
    centre_brain = brain[sel]

    # Deep grey nuclei either side of the ventricles.
    for side in (-1.0, 1.0):
        nucleus = ((cu - side * 0.27) / 0.13) ** 2 + ((cv + 0.02) / 0.2) ** 2 + ((cw - 0.02) / 0.14) ** 2
        centre_tissue[centre_brain & (nucleus < 1.0)] = DEEP_GREY

    # Lateral ventricles: curved, of a size that varies a lot between people; periventricular rim bright on FLAIR.
    vent_scale = rng.uniform(0.7, 1.5)
    bow = 0.1 + 0.22 * cv**2
    vent_distance = np.minimum(
        ((cu - 0.1) / (0.055 * vent_scale)) ** 2 + (cv / 0.42) ** 2 + ((cw - bow) / (0.085 * vent_scale)) ** 2,
        ((cu + 0.1) / (0.055 * vent_scale)) ** 2 + (cv / 0.42) ** 2 + ((cw - bow) / (0.085 * vent_scale)) ** 2,
    )
    centre_tissue[centre_brain & (vent_distance < 1.6) & (centre_tissue == WHITE)] = PERIVENTRICULAR
    centre_tissue[centre_brain & (vent_distance < 1.0)] = CSF
    choroid = ((np.abs(cu) - 0.1) / 0.04) ** 2 + ((cv - 0.25) / 0.08) ** 2 + ((cw - 0.12) / 0.04) ** 2
    centre_tissue[centre_brain & (choroid < 1.0)] = CHOROID
    third_ventricle = (np.abs(cu) < 0.018 * vent_scale) & (np.abs(cv) < 0.18) & (np.abs(cw + 0.02) < 0.1)
    centre_tissue[centre_brain & third_ventricle] = CSF
    tissue[sel] = centre_tissue

    # Unlabelled FLAIR-bright white-matter lesions: they look like small edema but are not tumour.
    for _ in range(int(rng.integers(0, 7))):
        centre = rng.uniform(-0.55, 0.55, size=3)
        r = rng.uniform(0.025, 0.07)
        sel, (bu, bv, bw) = _window(geom.grid, centre, (r, r, r))
        blob = (bu - centre[0]) ** 2 + (bv - centre[1]) ** 2 + (bw - centre[2]) ** 2 < r * r
        region = tissue[sel]
        region[blob & (region == WHITE)] = WM_LESION
    return tissue, depth


def _tumour_centre(rng: np.random.Generator, plan: TumourPlan, core_radius: float, edema_radius: float) -> np.ndarray:
    """Normalised tumour centre: deep in a hemisphere, or touching the cortex for 'edge' cases.

    The superior-inferior coordinate is kept far enough from the poles that the top and bottom brain slices stay
    tumour-free, as in real volumes.
    """
    w_limit = max(0.1, 0.85 - 1.2 * edema_radius)
    if plan.edge:
        direction = rng.normal(size=3) * np.array([1.0, 1.0, 0.35])
        direction /= np.linalg.norm(direction)
        centre = direction * (0.97 - 0.4 * core_radius)
        if abs(centre[2]) > w_limit:  # slide down (or up) the surface, keeping the distance from the centre
            horizontal = np.hypot(centre[0], centre[1])
            target = np.sqrt(max(np.dot(centre, centre) - w_limit**2, 0.0))
            centre[:2] *= target / max(horizontal, 1e-6)
            centre[2] = np.sign(centre[2]) * w_limit
        return centre
    while True:
        candidate = rng.uniform(-0.62, 0.62, size=3)
        candidate[2] *= w_limit / 0.62
        if 0.2 < np.linalg.norm(candidate) < 0.66 and abs(candidate[0]) > 0.12:
            return candidate


def _draw_tumour(
    rng: np.random.Generator,
    plan: TumourPlan,
    geom: BrainGeometry,
    tissue: np.ndarray,
    depth: np.ndarray,
    edema_ramp: np.ndarray,
    voxel_scale: float,
    satellite: bool = False,
) -> None:
    """Overwrite ``tissue`` with one tumour (edema envelope, core, enhancing rim, necrosis) in place.

    ``edema_ramp`` receives how strongly each edema voxel shows (1 inside, fading to ~0.45 at the border), so the
    visible edge of the edema is softer than its label, as in manual annotations.
    """
    edema_radius = rng.uniform(0.09, 0.15) if plan.small or satellite else rng.uniform(0.24, 0.46)
    core_radius = edema_radius * rng.uniform(0.45, 0.75 if plan.kind != "non_enhancing" else 0.85)
    centre = _tumour_centre(rng, plan, core_radius, edema_radius)
    rotation = _rotation_matrix(rng)
    elongation = rng.uniform(0.75, 1.25, size=3)

    # Work inside the tumour's bounding box only.
    extent = edema_radius * 2.3
    sel, (uu, vv, ww) = _window(geom.grid, centre, (extent, extent, extent))
    if any(s.stop <= s.start for s in sel):
        return
    uu, vv, ww = uu - centre[0], vv - centre[1], ww - centre[2]
    local = [rotation[i, 0] * uu + rotation[i, 1] * vv + rotation[i, 2] * ww for i in range(3)]
    norm = np.sqrt(sum((c / e) ** 2 for c, e in zip(local, elongation, strict=True)))
    box_shape = norm.shape

    brain = depth[sel] > 0
    under = tissue[sel]
    lumpy = smooth_field(rng, box_shape, max(3.0, 10 * voxel_scale))
    # Edema follows white matter and spares the cortex: grows further where the tissue is white.
    spread = np.where((under == GREY) | (under == CSF), 0.8, 1.0)
    edema_d = norm / edema_radius * np.clip(1.0 + 0.22 * lumpy, 0.6, None) / spread
    core_lumps = smooth_field(rng, box_shape, max(3.0, 7 * voxel_scale))
    core_d = norm / core_radius * np.clip(1.0 + 0.2 * core_lumps, 0.7, None)

    edema = brain & (edema_d < 1.0)
    core = brain & (core_d < 1.0)
    region = tissue[sel]  # views: writing to them writes to the case's maps
    ramp = edema_ramp[sel]
    region[edema & ~core & (region < TUMOUR_EDEMA)] = TUMOUR_EDEMA  # a satellite's edema keeps the first core
    ramp[edema] = np.maximum(ramp[edema], 0.45 + 0.55 * _smoothstep((1.0 - edema_d[edema]) / 0.25))
    if plan.kind == "non_enhancing":
        region[core] = TUMOUR_SOLID
    elif plan.kind == "solid" or plan.small or satellite:
        region[core] = TUMOUR_ENHANCING
        region[core & (core_d < 0.45) & (lumpy > 0.6)] = TUMOUR_SOLID
    else:
        rim = rng.uniform(0.22, 0.45) * (1.0 + 0.35 * lumpy)
        region[core] = TUMOUR_ENHANCING
        region[core & (core_d < 1.0 - rim)] = TUMOUR_NECROSIS


def _modality_image(
    rng: np.random.Generator,
    modality: str,
    tissue: np.ndarray,
    edema_ramp: np.ndarray,
    healthy: np.ndarray,
    texture: np.ndarray,
    brain: np.ndarray,
    voxel_scale: float,
) -> tuple[np.ndarray, dict[str, float]]:
    """Intensities of one modality: tissue contrast, partial volume, texture, bias field, Rician noise."""
    contrast = np.array(_TISSUE_CONTRAST[modality], dtype=np.float32)
    contrast[1:] *= rng.uniform(0.93, 1.07, size=N_TISSUES - 1).astype(np.float32)
    if modality == "flair":
        # How bright edema is relative to white matter varies a lot between scans (and so does the cortex).
        contrast[GREY] = 1.0 + rng.uniform(0.12, 0.3)
        contrast[TUMOUR_EDEMA] = 1.0 + rng.uniform(0.38, 0.85)
        contrast[WM_LESION] = 1.0 + rng.uniform(0.3, 0.6)
    image = contrast[tissue]
    # Faint edema blends with the tissue it infiltrates.
    edema = tissue == TUMOUR_EDEMA
    image[edema] = contrast[healthy[edema]] + edema_ramp[edema] * (contrast[TUMOUR_EDEMA] - contrast[healthy[edema]])
    image = ndimage.gaussian_filter(image, 0.6, truncate=2.0)
    # Texture, bias field and scale are all multiplicative: fold them into one factor, computed in place.
    gain = smooth_field(rng, tissue.shape, 60 * voxel_scale)
    gain *= rng.uniform(0.08, 0.2)
    np.exp(gain, out=gain)
    level = rng.uniform(*_WHITE_MATTER_LEVEL[modality])
    gain *= level
    gain *= 1.0 + rng.uniform(0.03, 0.06) * texture
    image *= gain
    sigma = rng.uniform(0.02, 0.045) * level
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= sigma
    image += noise
    image *= image
    rng.standard_normal(image.shape, dtype=np.float32, out=noise)
    noise *= sigma
    noise *= noise
    image += noise
    np.sqrt(image, out=image)
    np.rint(image, out=image)
    np.clip(image, 1, 32767, out=image)
    image = image.astype(np.int16)
    image[~brain] = 0
    stats = {"white_matter_level": round(float(level), 1), "noise_sigma": round(float(sigma), 2)}
    stats["max"] = int(image.max())
    return image, stats


def brats_case(
    shape: tuple[int, int, int], rng: np.random.Generator, index: int
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """One synthetic BraTS case.

    Args:
        shape: volume shape (x: right-to-left, y: anterior-to-posterior, z: inferior-to-superior).
        rng: the case's own random generator.
        index: position of the case in the collection; decides whether the tumour is small, near the edge, etc.

    Returns:
        ``(images, seg, info)``: int16 images keyed by :data:`MODALITIES` (background exactly 0), a uint8 label map
        with BraTS 2021 values {0, 1, 2, 4}, and a JSON-ready description of the tumour.
    """
    voxel_scale = float(min(shape[0] / 240.0, shape[1] / 240.0, shape[2] / 155.0))
    plan = tumour_plan_for_case(index, rng)
    geom = brain_geometry(shape, rng)
    tissue, depth = brain_tissue(geom, rng, voxel_scale)
    healthy = tissue.copy()
    edema_ramp = np.zeros(tissue.shape, dtype=np.float32)
    _draw_tumour(rng, plan, geom, tissue, depth, edema_ramp, voxel_scale)
    if plan.multifocal:
        _draw_tumour(rng, plan, geom, tissue, depth, edema_ramp, voxel_scale, satellite=True)

    brain = depth > 0
    texture = smooth_field(rng, tissue.shape, max(1.5, 3.0 * voxel_scale))
    images = {}
    levels = {}
    for modality in MODALITIES:
        box_image, levels[modality] = _modality_image(
            rng, modality, tissue, edema_ramp, healthy, texture, brain, voxel_scale
        )
        full = np.zeros(shape, dtype=np.int16)
        full[geom.box] = box_image
        images[modality] = full

    label_of_tissue = np.zeros(N_TISSUES, dtype=np.uint8)
    label_of_tissue[TUMOUR_EDEMA] = EDEMA
    label_of_tissue[TUMOUR_ENHANCING] = ENHANCING
    label_of_tissue[[TUMOUR_NECROSIS, TUMOUR_SOLID]] = NECROTIC_CORE
    seg = np.zeros(shape, dtype=np.uint8)
    seg[geom.box] = label_of_tissue[tissue]
    info = _case_info(seg, images["flair"], depth, tissue, plan, levels, voxel_scale)
    return images, seg, info


def _case_info(
    seg: np.ndarray,
    flair: np.ndarray,
    depth: np.ndarray,
    tissue: np.ndarray,
    plan: TumourPlan,
    levels: dict[str, dict[str, float]],
    voxel_scale: float,
) -> dict[str, Any]:
    """Facts about a case that tests and data preparation can check against the files."""
    tumour = seg > 0
    coords = np.nonzero(tumour)
    brain_z = np.nonzero(flair.any(axis=(0, 1)))[0]
    tumour_z = np.unique(coords[2])
    tumour_in_box = tissue >= TUMOUR_EDEMA
    touches_surface = bool(np.any(tumour_in_box & (depth < 4.0 * voxel_scale / 70.0 + 0.02)))
    n_tumour = int(tumour.sum())
    return {
        "tumour_type": plan.kind,
        "small": plan.small,
        "edge": bool(plan.edge and touches_surface),
        "multifocal": plan.multifocal,
        "tumour_voxels": n_tumour,
        "label_voxels": {str(k): int((seg == k).sum()) for k in (NECROTIC_CORE, EDEMA, ENHANCING)},
        "tumour_centre": [round(float(c.mean()), 1) for c in coords],
        "tumour_bbox": [[int(c.min()), int(c.max())] for c in coords],
        "tumour_slices": [int(tumour_z[0]), int(tumour_z[-1])],
        "brain_slices": [int(brain_z[0]), int(brain_z[-1])],
        "brain_voxels": int((flair > 0).sum()),
        "intensity": levels,
    }


# --------------------------------------------------------------------------------------------------------------
# Kaggle-like 2D head slices
# --------------------------------------------------------------------------------------------------------------
KAGGLE_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
SEQUENCES = ("t1", "t1ce", "t2", "flair")
_SEQUENCE_WEIGHTS = (0.2, 0.45, 0.2, 0.15)  # mostly post-contrast T1, as the Figshare part

# Intensity (0-1) of head layers and brain tissue per sequence look.
_SLICE_CONTRAST = {
    #        scalp  bone  diploe  csf   gm    wm
    "t1": (0.85, 0.06, 0.50, 0.12, 0.42, 0.62),
    "t1ce": (0.85, 0.06, 0.50, 0.14, 0.44, 0.62),
    "t2": (0.55, 0.05, 0.35, 0.92, 0.55, 0.36),
    "flair": (0.62, 0.05, 0.40, 0.10, 0.52, 0.42),
}
# Lesion intensity per class and sequence: (core, edema halo / rim). Glioma core in T1ce is a bright ring.
_LESION_CONTRAST = {
    "glioma": {"t1": (0.30, 0.50), "t1ce": (0.25, 0.88), "t2": (0.85, 0.72), "flair": (0.62, 0.74)},
    "meningioma": {"t1": (0.52, 0.0), "t1ce": (0.92, 0.0), "t2": (0.7, 0.0), "flair": (0.68, 0.0)},
    "pituitary": {"t1": (0.56, 0.0), "t1ce": (0.88, 0.0), "t2": (0.7, 0.0), "flair": (0.64, 0.0)},
}


def kaggle_slice(rng: np.random.Generator, cls: str, width: int, height: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One 2D axial head slice in the look of the Kaggle Brain Tumor MRI collection.

    Args:
        rng: the image's own random generator.
        cls: one of :data:`KAGGLE_CLASSES`.
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        ``(image, info)``: uint8 array of shape (height, width) and a JSON-ready description (sequence look,
        head placement, lesion centre and radius in pixels or None).
    """
    sequence = str(rng.choice(SEQUENCES, p=_SEQUENCE_WEIGHTS))
    side = min(width, height)
    head_a = side * rng.uniform(0.34, 0.41)  # left-right semi-axis
    head_b = min(head_a * rng.uniform(1.1, 1.24), height * 0.47)  # anterior-posterior semi-axis
    cx = width / 2 + rng.normal(0, 0.025) * width
    cy = height / 2 + rng.normal(0, 0.025) * height
    angle = float(np.clip(rng.normal(0, 0.09), -0.25, 0.25))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    u = (cos_a * dx + sin_a * dy) / head_a  # left-right, head-normalised
    v = (-sin_a * dx + cos_a * dy) / head_b  # anterior (-1, top) to posterior (+1)
    phi = np.arctan2(v, u)
    wobble = 1.0 + 0.015 * np.sin(3 * phi + rng.uniform(0, 6.3)) + 0.01 * np.sin(5 * phi + rng.uniform(0, 6.3))
    rho = np.sqrt(u * u + v * v) / wobble

    scalp_t, bone_t, csf_t = rng.uniform(0.05, 0.08), rng.uniform(0.045, 0.075), rng.uniform(0.01, 0.025)
    brain_edge = 1.0 - scalp_t - bone_t - csf_t
    scalp, bone, diploe, csf_v, grey, white = _SLICE_CONTRAST[sequence]
    image = np.zeros((height, width), dtype=np.float32)
    image[rho < 1.0] = scalp
    skull = (rho < 1.0 - scalp_t) & (rho >= 1.0 - scalp_t - bone_t)
    image[skull] = bone
    diploe_band = np.abs(rho - (1.0 - scalp_t - bone_t / 2)) < bone_t * 0.18
    image[diploe_band & skull] = diploe
    image[rho < 1.0 - scalp_t - bone_t] = csf_v

    pixel_scale = side / 256.0
    brain_r = rho / brain_edge
    brain = brain_r < 1.0
    ribbon = 0.1 + 0.05 * smooth_field(rng, (height, width), 14 * pixel_scale)
    sulcal = smooth_field(rng, (height, width), 9 * pixel_scale)
    image[brain] = white
    image[brain & (brain_r > 1.0 - ribbon)] = grey
    image[brain & (brain_r > 1.0 - ribbon * 1.1) & (np.abs(sulcal) < 0.14)] = csf_v
    # Slice height: skull-base slices show the sella and no lateral ventricles; pituitary adenomas live there.
    skull_base = rng.random() < (0.7 if cls == "pituitary" else 0.2)
    level = rng.uniform(0.0, 0.2) if skull_base else rng.uniform(0.2, 1.0)
    fissure = (np.abs(u) < 0.012 / max(pixel_scale, 0.5) + 0.006) & ((v < -0.45) | (v > 0.55)) & brain
    image[fissure] = csf_v
    centre = _pixel_window(u, v, 0.0, 0.0, 0.6, 0.95)
    if skull_base:
        _draw_skull_base(image[centre], u[centre], v[centre], brain[centre], _SLICE_CONTRAST[sequence])
    else:
        _draw_ventricles(rng, image[centre], u[centre], v[centre], brain[centre], csf_v, level)

    lesion = None
    if cls != "notumor":
        lesion = _draw_slice_lesion(rng, cls, sequence, image, u, v, brain_r, brain_edge, head_a, head_b)
        # Convert the lesion centre from head-normalised to pixel coordinates.
        lu, lv = lesion.pop("uv")
        px = cx + (cos_a * lu * head_a - sin_a * lv * head_b)
        py = cy + (sin_a * lu * head_a + cos_a * lv * head_b)
        lesion["centre_xy"] = [round(float(px), 1), round(float(py), 1)]

    image = _scanner_look(rng, image, pixel_scale)
    info = {
        "sequence": sequence,
        "head_centre_xy": [round(float(cx), 1), round(float(cy), 1)],
        "head_axes": [round(float(head_a), 1), round(float(head_b), 1)],
        "head_angle": round(angle, 3),
        "lesion": lesion,
    }
    return image, info


def _pixel_window(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, half_u: float, half_v: float
) -> tuple[slice, slice]:
    """Rows and columns of the image whose head coordinates fall within a box around ``(cu, cv)``."""
    inside = (np.abs(u - cu) < half_u) & (np.abs(v - cv) < half_v)
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _draw_ventricles(
    rng: np.random.Generator,
    image: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    brain: np.ndarray,
    csf_value: float,
    level: float,
) -> None:
    """Lateral ventricles: frontal horns diverging like a butterfly, large in mid slices, gone near the vertex."""
    size = rng.uniform(0.6, 1.5) * np.clip(1.4 - 1.8 * abs(level - 0.5), 0.0, 1.0)
    if size < 0.08:
        return
    spread = rng.uniform(0.12, 0.3)
    for side in (-1.0, 1.0):
        cu, cv = side * 0.1 * (0.7 + 0.3 * size), rng.normal(0.0, 0.03)
        tilt = -side * spread  # frontal horns open towards the front (top of the image)
        du, dv = u - cu, v - cv
        along = np.cos(tilt) * dv + np.sin(tilt) * du
        across = -np.sin(tilt) * dv + np.cos(tilt) * du
        horn = (across / (0.05 * size + 0.012)) ** 2 + (along / (0.24 * size + 0.05)) ** 2 < 1.0
        image[horn & brain] = csf_value


def _draw_skull_base(
    image: np.ndarray, u: np.ndarray, v: np.ndarray, brain: np.ndarray, values: tuple[float, ...]
) -> None:
    """Skull-base slice: orbits in front instead of frontal lobes, sphenoid sinus (air), sella at the midline."""
    scalp, bone, _, csf_value, _, _ = values
    front = brain & (v < -0.42)
    image[front] = 0.55 * scalp + 0.45 * bone  # orbital fat and bone
    for side in (-1.0, 1.0):
        globe = ((u - side * 0.3) / 0.15) ** 2 + ((v + 0.68) / 0.15) ** 2 < 1.0
        image[globe & brain] = csf_value
    sinus = (np.abs(u) < 0.1) & (v > -0.44) & (v < -0.3)
    image[sinus] = 0.0
    sella = (u / 0.07) ** 2 + ((v + 0.21) / 0.055) ** 2 < 1.0
    image[sella] = csf_value


def _draw_slice_lesion(
    rng: np.random.Generator,
    cls: str,
    sequence: str,
    image: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    brain_r: np.ndarray,
    brain_edge: float,
    head_a: float,
    head_b: float,
) -> dict[str, Any]:
    """Paint a lesion of class ``cls`` into ``image`` (in place); returns its placement and strength."""
    core_value, halo_value = _LESION_CONTRAST[cls][sequence]
    # Some lesions are subtle: only part of the way from the tissue intensity to the lesion intensity.
    strength = rng.uniform(0.4, 0.6) if rng.random() < 0.15 else rng.uniform(0.7, 1.0)
    if cls == "glioma":
        radius = brain_edge * rng.uniform(0.12, 0.3)
        angle = rng.uniform(0, 2 * np.pi)
        dist = brain_edge * rng.uniform(0.2, 0.62)
        cu, cv = np.cos(angle) * dist, np.sin(angle) * dist
        cu = np.sign(cu or 1.0) * max(abs(cu), radius * 0.6)  # stays in one hemisphere
    elif cls == "meningioma":
        radius = brain_edge * rng.uniform(0.1, 0.24)
        if rng.random() < 0.7:  # convexity: broad-based on the inner table of the skull, pushing the brain in
            angle = rng.uniform(0, 2 * np.pi)
            cu, cv = np.cos(angle) * (brain_edge - radius * 0.9), np.sin(angle) * (brain_edge - radius * 0.9)
        else:  # falx
            cu, cv = rng.choice([-1.0, 1.0]) * radius * 0.85, rng.uniform(-0.6, 0.6) * brain_edge
    else:  # pituitary: midline, in and above the sella
        radius = brain_edge * rng.uniform(0.07, 0.14)
        cu, cv = rng.normal(0, 0.015), -0.2 + rng.uniform(-0.06, 0.04)

    # Only the lesion's neighbourhood is touched (the glioma halo reaches ~2 radii, lumps add ~40%).
    aspect = head_b / head_a
    window = _pixel_window(u, v, cu, cv, radius * 2.8, radius * 2.8 / aspect)
    image, u, v, brain_r = image[window], u[window], v[window], brain_r[window]
    # Distance in (roughly isotropic) pixels-of-head units, with a lumpy outline for gliomas.
    du, dv = u - cu, (v - cv) * aspect
    dist_map = np.sqrt(du * du + dv * dv)
    if cls == "glioma":
        phi = np.arctan2(dv, du)
        lumps = sum(rng.uniform(0.05, 0.14) * np.sin(k * phi + rng.uniform(0, 6.3)) for k in (2, 3, 5))
        dist_map = dist_map / (1.0 + lumps)
    inside_head = brain_r < 1.0 + (0.08 if cls == "meningioma" else 0.0)
    core = (dist_map < radius) & inside_head
    tissue = image.copy()
    if cls == "glioma":
        halo = (dist_map < radius * rng.uniform(1.4, 1.9)) & inside_head & ~core
        image[halo] = tissue[halo] + strength * 0.8 * (halo_value - tissue[halo])
        if sequence == "t1ce":  # enhancing ring with a dark necrotic centre
            ring = core & (dist_map > radius * rng.uniform(0.55, 0.75))
            image[core] = tissue[core] + strength * (core_value - tissue[core])
            image[ring] = tissue[ring] + strength * (halo_value - tissue[ring])
        else:
            image[core] = tissue[core] + strength * (core_value - tissue[core])
    else:
        if cls == "meningioma":  # CSF cleft around a well-defined mass, often with some edema beyond it
            if rng.random() < 0.5:
                halo = (dist_map < radius * rng.uniform(1.3, 1.7)) & inside_head
                edema_value = _LESION_CONTRAST["glioma"][sequence][1 if sequence != "t1ce" else 0] * 0.5 + 0.25
                image[halo] = tissue[halo] + strength * 0.6 * (edema_value - tissue[halo])
            cleft = (dist_map < radius * 1.12) & ~core & inside_head
            csf_v = _SLICE_CONTRAST[sequence][3]
            image[cleft] = tissue[cleft] + strength * (csf_v - tissue[cleft])
        image[core] = tissue[core] + strength * (core_value - tissue[core])
    radius_px = float(radius * head_a)
    return {"uv": (float(cu), float(cv)), "radius": round(radius_px, 1), "strength": round(float(strength), 3)}


def _scanner_look(rng: np.random.Generator, image: np.ndarray, pixel_scale: float) -> np.ndarray:
    """Blur, bias field, noise and a display window, then 8-bit quantisation."""
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.1) * max(pixel_scale, 0.4))
    image = image * (1.0 + 0.05 * smooth_field(rng, image.shape, 4 * pixel_scale))
    image = image * np.exp(rng.uniform(0.05, 0.15) * smooth_field(rng, image.shape, 120 * pixel_scale))
    sigma = rng.uniform(0.008, 0.035)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag)
    image = np.clip(image * rng.uniform(0.85, 1.2), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
