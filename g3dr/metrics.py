"""Evaluation metrics for G3DR, each a plain function on tensors with its reference.

Images are [N,3,H,W] (or [3,H,W]) floats in [0, data_range]; depth maps are [N,H,W] (or [H,W]) in
scene units (G3DR: distance along the ray); point sets are [N,3]; occupancy grids are bool.

- 2D quality vs truth: `psnr`, `ssim`, `lpips_distance`; `view_metrics` bundles them with `depth_errors`
- distributions: `fid`, `kid`, `inception_score` (torchmetrics) on `inception_extractor(path)` or any
  feature-extractor module
- geometry proxies of the paper: `nfs` (3DGP's non-flatness score), `depth_accuracy`
- geometry vs truth: `depth_errors`, `iou`, `chamfer`, `fscore`
- Table S1 (robustness to density scaling): `sigma_scaled_params`, `density_scaled_rays`, `scale_density`

The heavy optional packages (torchmetrics, torch-fidelity, scipy) load inside the functions that use
them: `pip install "g3dr[eval]"`.

Example:
    nfs(depths, 4.0, 6.0)                                 # depths [256,H,W] rendered at the canonical view
    fid(real, fake, inception_extractor("weights/" + INCEPTION_WEIGHTS_FILE))
    d, t = density_scaled_rays(rays_d, 10.0, depths)      # Table S1, s = 10; rendered depth / 10
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Images = Union[Tensor, Iterable[Tensor]]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)


class PerImage(NamedTuple):
    """A metric per image ([N]) and its mean over the images (a float)."""
    per_image: Tensor
    mean: float


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if isinstance(t, Tensor) else type(t).__name__


def _as_batch(name: str, x, ndim: int, what: str) -> Tensor:
    """x [N,...] with `ndim` dims, or one item with ndim-1 dims (gets N = 1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() == ndim - 1:
        x = x.unsqueeze(0)
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got [{_shape(x)}]")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _pair(a, b, ndim: int, what: str) -> Tuple[Tensor, Tensor]:
    a = _as_batch("a", a, ndim, what)
    b = _as_batch("b", b, ndim, what)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape {what}, got [{_shape(a)}] and [{_shape(b)}]")
    return a, b.to(a.device)


# ---------------------------------------------------------------------------------------------
# Image quality against ground truth
# ---------------------------------------------------------------------------------------------


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> PerImage:
    """Peak signal-to-noise ratio, 10 log10(data_range^2 / MSE) in dB, per image and mean.

    a, b: [N,C,H,W] or [C,H,W] in [0, data_range]. Identical images give +inf (so does the mean
    when any image is identical). Reference: the standard definition (e.g. Huynh-Thu & Ghanbari 2008).
    """
    a, b = _pair(a, b, 4, "[N,C,H,W] images")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    per = 10 * torch.log10(data_range ** 2 / mse)  # mse = 0 -> +inf, as documented
    return PerImage(per.float(), float(per.mean()))


def _gaussian_window(size: int, sigma: float, dtype, device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> PerImage:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004) with an 11x11
    Gaussian window (sigma 1.5), computed on the valid region (no padding) per channel and averaged
    over pixels and channels: per image [N] and mean. Equals scikit-image's `structural_similarity`
    with gaussian_weights=True, sigma=1.5, use_sample_covariance=False (torchmetrics also averages
    over reflect-padded borders, so it differs slightly).

    a, b: [N,C,H,W] or [C,H,W] in [0, data_range]; H and W must be >= window.
    """
    a, b = _pair(a, b, 4, "[N,C,H,W] images")
    if not (isinstance(window, int) and window >= 1 and window % 2 == 1):
        raise ValueError(f"window must be an odd integer >= 1, got {window}")
    if a.shape[-1] < window or a.shape[-2] < window:
        raise ValueError(f"ssim needs images at least {window}x{window} (the window), got [{_shape(a)}]")
    x, y = a.double(), b.double()
    C = x.shape[1]
    g = _gaussian_window(window, sigma, x.dtype, x.device)
    kh = g.view(1, 1, -1, 1).expand(C, 1, window, 1)
    kw = g.view(1, 1, 1, -1).expand(C, 1, 1, window)

    def blur(t):  # separable Gaussian, depthwise, valid region only
        return F.conv2d(F.conv2d(t, kh, groups=C), kw, groups=C)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    per = smap.flatten(1).mean(1)
    return PerImage(per.float(), float(per.mean()))


@torch.no_grad()
def lpips_distance(a: Tensor, b: Tensor, net: nn.Module, batch_size: int = 16) -> PerImage:
    """LPIPS (Zhang, Isola, Efros, Shechtman & Wang, CVPR 2018) per image and mean.

    a, b: [N,3,H,W] or [3,H,W] in [0,1] (rescaled to [-1,1] for the network). `net` is an already
    built `lpips.LPIPS` module (e.g. `lpips.LPIPS(net='vgg')`; loading its weights is the caller's
    job). Identical images give 0. Runs on the device of `net`'s parameters, in batches.
    """
    a, b = _pair(a, b, 4, "[N,3,H,W] images")
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a built lpips.LPIPS module, got {type(net).__name__}")
    if a.shape[1] != 3:
        raise ValueError(f"LPIPS takes RGB images [N,3,H,W], got [{_shape(a)}]")
    p = next(net.parameters(), None)
    dev = p.device if p is not None else a.device
    out = []
    for i in range(0, a.shape[0], batch_size):
        d = net(a[i:i + batch_size].to(dev).float(), b[i:i + batch_size].to(dev).float(), normalize=True)
        out.append(d.reshape(-1).cpu())
    per = torch.cat(out)
    return PerImage(per, float(per.mean()))


# ---------------------------------------------------------------------------------------------
# FID / KID / IS (torchmetrics), Inception weights from a local file
# ---------------------------------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (the TF-FID port used by EG3D's protocol) as a feature extractor
    for torchmetrics: images [N,3,H,W] float in [0,1] (any size; resized to 299 inside) ->
    features [N, num_features] (`feature` "2048" pool features for FID/KID, "logits_unbiased" for IS).
    """

    def __init__(self, weights_path: Union[str, Path], feature: str = "2048"):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found: {path}. FID/KID/IS need torch-fidelity's InceptionV3 weights "
                f"file {INCEPTION_WEIGHTS_FILE}; download it once from {INCEPTION_WEIGHTS_URL} and pass its path "
                f"(or pass your own feature-extractor module instead).")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError("FID/KID/IS with Inception need torch-fidelity: pip install 'g3dr[eval]'") from e
        sizes = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008, "logits": 1008}
        if str(feature) not in sizes:
            raise ValueError(f"feature must be one of {sorted(sizes)}, got {feature!r}")
        self.feature = str(feature)
        self.num_features = sizes[self.feature]
        # torch-fidelity would torch.load the file with weights_only=False (unpickling, which can run
        # code): we read it with weights_only=True and hand it the state dict in place of its download
        from unittest import mock

        import torch_fidelity.feature_extractor_inceptionv3 as fx

        from .files import torch_load
        state = torch_load(path)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} is not an Inception state dict (a mapping of names to tensors)")
        with mock.patch.object(fx, "load_state_dict_from_url", lambda *a, **k: state):
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", [self.feature],
                                                   feature_extractor_weights_path=None)
        self.net.eval()

    def train(self, mode: bool = True):  # frozen: never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # torch-fidelity takes uint8 in [0,255]
        out = self.net(x)
        return (out[0] if isinstance(out, (tuple, list)) else out).reshape(x.shape[0], -1)


def inception_extractor(weights_path: Union[str, Path], feature: str = "2048") -> InceptionFeatures:
    """The Inception feature extractor from a local weights file (torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth`); FileNotFoundError naming the file and where to get
    it when missing. Use feature="2048" for `fid`/`kid`, "logits_unbiased" for `inception_score`."""
    return InceptionFeatures(weights_path, feature)


def _batches(images: Images, batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        images = _as_batch("images", images, 4, "[N,3,H,W] images in [0,1]")
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
    else:
        for i, x in enumerate(images):
            yield _as_batch(f"images batch {i}", x, 4, "[N,3,H,W] images in [0,1]")


def _check_extractor(extractor) -> nn.Module:
    if not isinstance(extractor, nn.Module):
        raise TypeError(f"extractor must be an nn.Module (images [N,3,H,W] in [0,1] -> features [N,F]), e.g. "
                        f"inception_extractor(path); got {type(extractor).__name__}")
    return extractor


def _device(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Sized(nn.Module):
    """An extractor with its feature count attached (torchmetrics' FID otherwise probes the module
    with a uint8 299x299 image, which a float feature extractor may not accept)."""

    def __init__(self, extractor: nn.Module, num_features: int):
        super().__init__()
        self.extractor, self.num_features = extractor, num_features

    def forward(self, x):
        return self.extractor(x)


def _sized(ext: nn.Module, probe: Tensor) -> nn.Module:
    if isinstance(getattr(ext, "num_features", None), int):
        return ext
    f = ext(probe[:1].to(_device(ext)))
    if not isinstance(f, Tensor) or f.dim() != 2:
        raise ValueError(f"the extractor must return features [B,F], got [{_shape(f)}] for images "
                         f"[{_shape(probe[:1])}]")
    return _Sized(ext, f.shape[1])


@torch.no_grad()
def fid(real: Images, fake: Images, extractor: nn.Module, batch_size: int = 64) -> float:
    """Fréchet Inception Distance (Heusel et al., NeurIPS 2017) between two image sets, through
    torchmetrics' FrechetInceptionDistance. real/fake: [N,3,H,W] in [0,1] or an iterable of such
    batches (N >= 2 each in total). `extractor`: `inception_extractor(path)` (the EG3D/StyleGAN
    protocol) or any module mapping images [B,3,H,W] in [0,1] to features [B,F]. Identical sets -> ~0."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    ext = _check_extractor(extractor)
    dev = _device(ext)
    real_b, fake_b = list(_batches(real, batch_size)), list(_batches(fake, batch_size))
    if not real_b or not fake_b:
        raise ValueError("fid needs at least 2 real and 2 fake images, got an empty set")
    m = FrechetInceptionDistance(feature=_sized(ext, real_b[0]), normalize=False).to(dev)
    for x in real_b:
        m.update(x.to(dev), real=True)
    for x in fake_b:
        m.update(x.to(dev), real=False)
    return float(m.compute())


@torch.no_grad()
def kid(real: Images, fake: Images, extractor: nn.Module, subsets: int = 100, subset_size: int = 1000,
        batch_size: int = 64) -> Tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., ICLR 2018; cubic polynomial kernel, unbiased MMD^2)
    -> (mean, std) over `subsets` random subsets, through torchmetrics. `subset_size` is capped at
    the smaller set size. Inputs and `extractor` as in `fid`."""
    from torchmetrics.image.kid import KernelInceptionDistance
    ext = _check_extractor(extractor)
    dev = _device(ext)
    real_b, fake_b = list(_batches(real, batch_size)), list(_batches(fake, batch_size))
    n = min(sum(x.shape[0] for x in real_b), sum(x.shape[0] for x in fake_b))
    if n < 2:
        raise ValueError(f"kid needs at least 2 real and 2 fake images, got {n}")
    import warnings
    with warnings.catch_warnings():  # torchmetrics warns that it keeps the features in memory
        warnings.simplefilter("ignore", UserWarning)
        m = KernelInceptionDistance(feature=ext, subsets=subsets, subset_size=min(subset_size, n),
                                    normalize=False).to(dev)
    for x in real_b:
        m.update(x.to(dev), real=True)
    for x in fake_b:
        m.update(x.to(dev), real=False)
    mean, std = m.compute()
    return float(mean), float(std)


@torch.no_grad()
def inception_score(images: Images, extractor: nn.Module, splits: int = 10, batch_size: int = 64
                    ) -> Tuple[float, float]:
    """Inception Score (Salimans et al., NeurIPS 2016): exp(E_x KL(p(y|x) || p(y))) -> (mean, std)
    over `splits` splits, through torchmetrics. `extractor` returns class logits [B,K]:
    `inception_extractor(path, "logits_unbiased")` or any such module."""
    from torchmetrics.image.inception import InceptionScore
    ext = _check_extractor(extractor)
    dev = _device(ext)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = InceptionScore(feature=ext, splits=splits, normalize=False).to(dev)
    for x in _batches(images, batch_size):
        m.update(x.to(dev))
    mean, std = m.compute()
    return float(mean), float(std)


# ---------------------------------------------------------------------------------------------
# Depth: the paper's proxies and errors against truth
# ---------------------------------------------------------------------------------------------


def _depths(name: str, d) -> Tensor:
    d = _as_batch(name, d, 3, "[N,H,W] depth maps")
    if not torch.isfinite(d).all():
        raise ValueError(f"{name} [{_shape(d)}] contains NaN or inf")
    return d


def nfs(depths: Tensor, min_depth: float, max_depth: float, bins: int = 64, reduction: str = "mean"
        ) -> Union[float, Tensor]:
    """Non-flatness score (Skorokhodov et al., 3DGP, ICLR 2023; adopted by G3DR, supplement eq. 2):
    each depth map is clamped to [min_depth, max_depth] (the ray bounds), binned into a `bins`-bin
    histogram over that range, p = counts / total, and NFS = exp(-sum p log p) (the perplexity of
    the depth histogram, 1 for a flat map, at most `bins`). Returns the mean over the N maps
    (reduction="mean", a float; the paper uses N = 256) or the per-map scores [N] ("none").

    depths: [N,H,W] or [H,W]. Bin k covers [min + k w, min + (k+1) w), w = (max - min) / bins; the
    top edge falls in the last bin.
    """
    d = _depths("depths", depths)
    if not max_depth > min_depth:
        raise ValueError(f"need min_depth < max_depth, got {min_depth}, {max_depth}")
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"bins must be an integer >= 1, got {bins}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    x = (d.double().clamp(min_depth, max_depth) - min_depth) / (max_depth - min_depth)
    idx = (x * bins).floor().long().clamp(0, bins - 1).flatten(1)
    counts = torch.zeros(idx.shape[0], bins, dtype=torch.float64, device=d.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)
    ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)
    per = ent.exp()
    return float(per.mean()) if reduction == "mean" else per.float()


def depth_accuracy(pred: Tensor, ref: Tensor, eps: float = 1e-8) -> float:
    """Depth accuracy as G3DR's supplement defines it: the MSE between the rendered and the
    reference depth maps, each normalised by its own mean and standard deviation (population std),
    averaged over pixels and then over the N maps (lower is better; 0 for maps equal up to
    a d + b with a > 0). pred, ref: [N,H,W] or [H,W]. A constant map (std 0) divides by `eps`."""
    p, r = _pair(_depths("pred", pred), _depths("ref", ref), 3, "[N,H,W] depth maps")

    def norm(t):
        t = t.double().flatten(1)
        return (t - t.mean(1, keepdim=True)) / t.std(1, unbiased=False, keepdim=True).clamp_min(eps)

    return float((norm(p) - norm(r)).pow(2).mean(1).mean())


def depth_errors(pred: Tensor, true: Tensor, mask: Optional[Tensor] = None) -> dict:
    """Absolute depth error against ground truth over all (masked) pixels of all maps:
    {"abs_mean", "abs_median", "rmse", "count"} (depth units; count = pixels used).
    pred, true: [N,H,W] or [H,W]; mask: bool of the same shape (e.g. pixels whose true ray hits the
    scene); with no mask every pixel counts."""
    p, t = _pair(_depths("pred", pred), _depths("true", true), 3, "[N,H,W] depth maps")
    err = (p.double() - t.double()).abs()
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        m = mask.unsqueeze(0) if mask.dim() == 2 else mask
        if m.shape != err.shape:
            raise ValueError(f"mask must match the depth maps [{_shape(err)}], got [{_shape(mask)}]")
        err = err[m.to(err.device)]
    err = err.reshape(-1)
    if err.numel() == 0:
        raise ValueError("depth_errors: the mask selects no pixel")
    return {"abs_mean": float(err.mean()), "abs_median": float(err.median()),
            "rmse": float(err.pow(2).mean().sqrt()), "count": int(err.numel())}


FOG_MARGIN = 0.1  # depth units: a prediction this far in front of the truth counts as fog


def depth_split(pred: Tensor, true: Tensor, objects: Optional[Tensor] = None, margin: float = FOG_MARGIN) -> dict:
    """Training diagnostics on depth maps pred, true [...] (same shape) with an object mask of that
    shape (True where the pixel sees an object, False where it sees the background):
    {"depth_err_obj", "depth_err_bg"} mean absolute errors, "fog_obj" the fraction of object pixels
    predicted more than `margin` in front of the truth, "behind_obj" the fraction more than `margin`
    behind it. Without a mask every pixel counts as an object pixel. Terms over an empty set are NaN."""
    p, t = pred.detach().double(), true.detach().double()
    if p.shape != t.shape:
        raise ValueError(f"depth_split: pred [{_shape(p)}] and true [{_shape(t)}] differ in shape")
    obj = torch.ones_like(p, dtype=torch.bool) if objects is None else objects.to(p.device).bool()
    if obj.shape != p.shape:
        raise ValueError(f"depth_split: objects [{_shape(obj)}] must match the depth maps [{_shape(p)}]")
    err, nan = (p - t).abs(), float("nan")

    def mean(x, m):
        return float(x[m].mean()) if bool(m.any()) else nan

    return {"depth_err_obj": mean(err, obj), "depth_err_bg": mean(err, ~obj),
            "fog_obj": mean((p < t - margin).double(), obj), "behind_obj": mean((p > t + margin).double(), obj)}


def view_metrics(pred_rgb: Tensor, true_rgb: Tensor, pred_depth: Optional[Tensor] = None,
                 true_depth: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                 lpips_net: Optional[nn.Module] = None) -> dict:
    """The novel-view numbers against ground truth for one batch of views, as a flat dict of floats:
    psnr, ssim (when H, W >= 11), lpips (when `lpips_net` is given) on images [N,3,H,W] in [0,1], and
    depth_abs_mean / depth_abs_median / depth_rmse on depths [N,H,W] over `mask` [N,H,W] (e.g. the
    pixels whose true ray hits the scene) when depths are given. PSNR averages per-image dB values."""
    out = {"psnr": psnr(pred_rgb, true_rgb).mean}
    if min(pred_rgb.shape[-2:]) >= 11:
        out["ssim"] = ssim(pred_rgb, true_rgb).mean
    if lpips_net is not None:
        out["lpips"] = lpips_distance(pred_rgb, true_rgb, lpips_net).mean
    if (pred_depth is None) != (true_depth is None):
        raise ValueError("give both pred_depth and true_depth, or neither")
    if pred_depth is not None:
        e = depth_errors(pred_depth, true_depth, mask)
        out.update(depth_abs_mean=e["abs_mean"], depth_abs_median=e["abs_median"], depth_rmse=e["rmse"])
    return out


# ---------------------------------------------------------------------------------------------
# Geometry against ground truth
# ---------------------------------------------------------------------------------------------


def iou(occ_a: Tensor, occ_b: Tensor) -> float:
    """Volume IoU |A and B| / |A or B| of two occupancy grids (bool, same shape, e.g. [N,N,N] over the
    same box; Mescheder et al., Occupancy Networks, CVPR 2019). Two empty grids give 1.0."""
    for name, o in (("occ_a", occ_a), ("occ_b", occ_b)):
        if not isinstance(o, Tensor) or o.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {getattr(o, 'dtype', type(o).__name__)}")
    if occ_a.shape != occ_b.shape:
        raise ValueError(f"occupancy grids must have the same shape, got [{_shape(occ_a)}] and [{_shape(occ_b)}]")
    b = occ_b.to(occ_a.device)
    union = (occ_a | b).sum().item()
    return 1.0 if union == 0 else (occ_a & b).sum().item() / union


def _points(name: str, p) -> Tensor:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N,3], got {type(p).__name__}")
    if p.dim() != 2 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N,3] point set, got [{_shape(p)}]")
    if not torch.isfinite(p).all():
        raise ValueError(f"{name} [{_shape(p)}] contains NaN or inf")
    return p


def nearest_distances(points_a: Tensor, points_b: Tensor, chunk: int = 4096, method: str = "auto") -> Tensor:
    """For each point of a [N,3], the Euclidean distance to its nearest point of b [M,3] -> [N].

    method "torch": brute force in chunk x chunk blocks (memory O(chunk^2), any device);
    "kdtree": scipy's cKDTree (CPU, O(N log M)); "auto": kdtree for CPU tensors when scipy is
    installed, else torch."""
    a, b = _points("points_a", points_a), _points("points_b", points_b).to(points_a.device)
    if method not in ("auto", "torch", "kdtree"):
        raise ValueError(f"method must be 'auto', 'torch' or 'kdtree', got {method!r}")
    if method == "auto":
        try:
            import scipy.spatial  # noqa: F401
            method = "kdtree" if a.device.type == "cpu" else "torch"
        except ImportError:
            method = "torch"
    if method == "kdtree":
        from scipy.spatial import cKDTree
        d, _ = cKDTree(b.detach().double().cpu().numpy()).query(a.detach().double().cpu().numpy(), k=1)
        return torch.from_numpy(d).to(a.device, torch.float64)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    a64, b64 = a.detach().double(), b.detach().double()
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    for i in range(0, a64.shape[0], chunk):
        ai = a64[i:i + chunk]
        best = torch.full((ai.shape[0],), math.inf, dtype=torch.float64, device=a.device)
        for j in range(0, b64.shape[0], chunk):
            best = torch.minimum(best, torch.cdist(ai, b64[j:j + chunk]).amin(1))
        out[i:i + chunk] = best
    return out


def chamfer(points_a: Tensor, points_b: Tensor, chunk: int = 4096, method: str = "auto") -> float:
    """Chamfer-L1 distance as in Occupancy Networks (Mescheder et al., CVPR 2019):
    0.5 (mean_a min_b |a - b| + mean_b min_a |b - a|), unsquared Euclidean distances, in scene units.
    points_a [N,3], points_b [M,3] (e.g. samples on a mesh and on the true surface). Chunked so 100k
    x 100k points fit in a few MiB (see `nearest_distances`)."""
    ab = nearest_distances(points_a, points_b, chunk, method)
    ba = nearest_distances(points_b, points_a, chunk, method)
    return float(0.5 * (ab.mean() + ba.mean()))


def fscore(points_a: Tensor, points_b: Tensor, threshold: float, chunk: int = 4096, method: str = "auto") -> dict:
    """F-score at distance `threshold` (Tatarchenko et al., "What do single-view 3D reconstruction
    networks learn?", CVPR 2019): precision = fraction of a (prediction) within threshold of b,
    recall = fraction of b (truth) within threshold of a, F = 2 P R / (P + R) (0 when both are 0).
    Returns {"fscore", "precision", "recall"}."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    prec = float((nearest_distances(points_a, points_b, chunk, method) < threshold).double().mean())
    rec = float((nearest_distances(points_b, points_a, chunk, method) < threshold).double().mean())
    f = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return {"fscore": f, "precision": prec, "recall": rec}


# ---------------------------------------------------------------------------------------------
# Table S1: robustness to density scaling
# ---------------------------------------------------------------------------------------------
# The renderer's density is softplus(sigma + density_bias), sigma the decoder's raw output. The
# paper's Table S1 multiplies the *density field* by s. That cannot be folded into the decoder
# weights (softplus is not homogeneous), but it is exact through the ray parametrisation: the
# points o + t d are unchanged by (d, t) -> (d / s, s t), while every interval delta = t_{i+1} - t_i
# grows by s, so alpha_i = 1 - exp(-density_i * s * delta_i) is exactly the compositing of density
# s * density; colour, opacity and weights are unchanged and the rendered depth comes out times s.
# `density_scaled_rays` does that (the reading used for Table S1). `scale_density` gives, per sample,
# the raw sigma whose density is exactly s times (for the unfused sample -> decode -> composite path),
# and `sigma_scaled_params` the other reading, raw sigma times s, exact in the decoder weights.


def _check_scale(s: float) -> float:
    s = float(s)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"the density scale s must be a finite number > 0, got {s}")
    return s


def density_scaled_rays(rays_d: Tensor, s: float, depths: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Optional[Tensor]]:
    """Rays that render the density field multiplied by s exactly (Table S1): rays_d [B,R,3] ->
    rays_d / s, and depths [B,R,S] (if given) -> s * depths. Render with these (fused
    `render_triplanes`, or `TriplaneRenderer`, whose box bounds and samples scale along by
    themselves; fixed ray_start/ray_end must be multiplied by s too) and divide the rendered depth
    by s; rgb, opacity and weights need no change. s = 1 returns the inputs unchanged."""
    s = _check_scale(s)
    if not isinstance(rays_d, Tensor) or rays_d.shape[-1:] != (3,):
        raise ValueError(f"rays_d must be a [..., 3] tensor, got [{_shape(rays_d)}]")
    return rays_d / s, None if depths is None else depths * s


def scale_density(sigma: Tensor, s: float, density_bias: float = -1.0) -> Tensor:
    """Raw sigma' with softplus(sigma' + bias) = s * softplus(sigma + bias) exactly (any shape).
    Apply it to the interval (mid) sigmas of `reference.composite_intervals` to composite the density
    field times s; `composite` averages per-sample sigmas before the softplus, so per-sample scaling
    there is only approximate. Uses softplus^-1(y) = y + log(-expm1(-y)), stable for large and small y."""
    s = _check_scale(s)
    y = F.softplus(sigma + density_bias) * s
    tiny = torch.finfo(y.dtype).tiny
    y = y.clamp_min(tiny)  # density 0 underflowed: keep it representable (softplus^-1(tiny) ~ -87 in fp32)
    return y + torch.log(-torch.expm1(-y)) - density_bias


def sigma_scaled_params(params: Union[nn.Module, Sequence[Tensor]], s: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decoder effective params (w1, b1, w2, b2) whose raw sigma output is multiplied by s, exactly
    (row 0 of the last layer and its bias times s): density = softplus(s sigma + density_bias).
    `params`: a `TriplaneDecoder` (its `effective_params()`) or the 4-tuple. This sharpens the
    density field rather than scaling it (see `density_scaled_rays` for the paper's reading)."""
    s = _check_scale(s)
    if isinstance(params, nn.Module):
        if not hasattr(params, "effective_params"):
            raise TypeError(f"expected a TriplaneDecoder (with effective_params()), got {type(params).__name__}")
        params = params.effective_params()
    if len(params) != 4:
        raise ValueError(f"expected (w1, b1, w2, b2), got {len(params)} tensors")
    w1, b1, w2, b2 = (p.detach() for p in params)
    scale = torch.ones(w2.shape[0], dtype=w2.dtype, device=w2.device)
    scale[0] = s
    return w1.clone(), b1.clone(), w2 * scale[:, None], b2 * scale
