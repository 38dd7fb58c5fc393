"""Losses of both training stages (paper eq. 5 and eq. 10–13, appendix A.1).

Depth stage: photometric error Pe (SSIM + L1, α = 0.8), monodepth2's per-pixel minimum reprojection and
auto-masking, edge-aware disparity smoothness.

DaGAN stage: LSGAN + discriminator feature matching, equivariance under random affine + thin-plate-spline
transforms, the keypoint distance loss and the landmark terms. The pyramid perceptual loss and its
feature networks are in :mod:`training.perceptual`.

Everything here computes in float32 even under autocast: SSIM's variance terms and small keypoint
distances lose too much in half precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dagan.nets.blocks import inverse_2x2, make_coordinate_grid

# ==================================================================================== depth stage


def ssim_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1 − SSIM)/2 per pixel: B×C×H×W, B×C×H×W → B×C×H×W in [0, 1].

    3×3 local statistics over a reflection-padded image (the monodepth2 formulation), so the map keeps
    the input size and border pixels are not dragged down by zero padding.
    """
    c1, c2 = 0.01**2, 0.03**2
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    sigma_x = F.avg_pool2d(x * x, 3, 1) - mu_x**2
    sigma_y = F.avg_pool2d(y * y, 3, 1) - mu_y**2
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2)
    return torch.clamp((1 - num / den) / 2, 0, 1)


def photometric_error(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.8) -> torch.Tensor:
    """Pe = α·(1 − SSIM)/2 + (1 − α)·|pred − target| (paper eq. 5), averaged over channels → B×1×H×W.

    The paper writes α(1 − SSIM); the /2 maps the dissimilarity to [0, 1] like the L1 term, as in
    monodepth2 [4] which the paper follows. α = 0.8 is the paper's value (monodepth2 uses 0.85).
    """
    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().mean(1, keepdim=True)
    return alpha * ssim_distance(pred, target).mean(1, keepdim=True) + (1 - alpha) * l1


def reprojection_loss(
    warped: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    target: torch.Tensor,
    alpha: float = 0.8,
    min_reprojection: bool = True,
    automask: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """monodepth2's photometric objective for one scale; returns (loss scalar, B×1×H×W mask of pixels used).

    warped: each source frame inverse-warped into the target view, sources: the unwarped source frames,
    target: I_i (all B×3×H×W). Per pixel, the minimum error over the warped sources is taken (a pixel
    occluded in one neighbour is usually visible in the other) or the mean when ``min_reprojection`` is
    off. Auto-masking adds the *unwarped* sources as candidates: a pixel they explain better than any
    warp (a static background, a face moving with the camera) is ignored instead of pushing the depth to
    infinity. A tiny random offset on the identity errors breaks exact ties, as in monodepth2.
    """
    errors = torch.cat([photometric_error(w, target, alpha) for w in warped], dim=1)  # B×S×H×W
    reproj = errors.min(dim=1, keepdim=True)[0] if min_reprojection else errors.mean(1, keepdim=True)
    if not automask:
        return reproj.mean(), torch.ones_like(reproj)
    identity = torch.cat([photometric_error(s, target, alpha) for s in sources], dim=1)
    noise = torch.randn(identity.shape, generator=generator, dtype=identity.dtype) * 1e-5
    identity = identity + noise.to(identity.device)
    identity_min = identity.min(dim=1, keepdim=True)[0]
    combined = torch.cat([identity_min, reproj], dim=1)
    best, which = combined.min(dim=1, keepdim=True)
    return best.mean(), (which == 1).float()


def edge_aware_smoothness(disp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of a disparity map B×1×H×W given the image B×3×H×W (scalar).

    The disparity is first divided by its per-image mean, so the loss cannot be lowered by shrinking
    the whole depth range; its gradients are penalised except across image edges (weight exp(−|∂I|)).
    """
    disp = disp.float()
    image = image.float()
    disp = disp / (disp.mean(dim=(2, 3), keepdim=True) + 1e-7)
    gdx = (disp[..., :, :-1] - disp[..., :, 1:]).abs()
    gdy = (disp[..., :-1, :] - disp[..., 1:, :]).abs()
    gix = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(1, keepdim=True)
    giy = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(1, keepdim=True)
    return (gdx * torch.exp(-gix)).mean() + (gdy * torch.exp(-giy)).mean()


# =================================================================================== landmark terms


def landmark_prior_loss(kp: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Mean |kp − landmark| over the points whose landmarks exist (NaN = no face found in that frame).

    kp, landmarks: B×K×2 in the keypoints' [−1, 1] frame. Returns 0 (with a graph) when none exist.
    """
    valid = torch.isfinite(landmarks).all(dim=-1, keepdim=True)  # B×K×1
    diff = (kp.float() - torch.nan_to_num(landmarks.float())).abs() * valid
    return diff.sum() / (valid.sum() * 2).clamp(min=1)


def landmark_motion_loss(
    kp_source: torch.Tensor,
    kp_driving: torch.Tensor,
    lm_source: torch.Tensor,
    lm_driving: torch.Tensor,
    point_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean |(kp_d − kp_s) − (lm_d − lm_s)|: each keypoint's displacement between the two frames
    against its landmark's.

    Relative motion (the server's mode) moves the photo's keypoints by the driver's keypoint
    *displacements*, so those are what must follow the face; a constant offset of a keypoint from its
    landmark costs nothing here. A lip opening by 3 px at 128 px is a 0.05 change in this frame, small
    beside head motion, hence ``point_weights`` (K) to weigh the mouth and eyelid points up.
    kp_*, lm_*: B×K×2 in [−1, 1]; NaN landmarks (no face) are skipped. Returns 0 when none exist.
    """
    valid = (torch.isfinite(lm_source).all(-1) & torch.isfinite(lm_driving).all(-1)).unsqueeze(-1)
    target = torch.nan_to_num(lm_driving.float()) - torch.nan_to_num(lm_source.float())
    return _weighted_point_l1(kp_driving.float() - kp_source.float(), target, valid, point_weights)


def _weighted_point_l1(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, point_weights: torch.Tensor | None
) -> torch.Tensor:
    """Mean |pred − target| over the valid points, each point weighted by ``point_weights``.

    pred, target: B×P×2 (target finite), valid: B×P×1 bool, point_weights: P or None (all 1). Returns 0
    (with a graph) when no point is valid. The landmark terms below share it so they weigh points alike.
    """
    diff = (pred - target).abs() * valid  # B×P×2
    weight = valid.float().expand_as(diff)
    if point_weights is not None:
        w = point_weights.to(diff).view(1, -1, 1)
        diff, weight = diff * w, weight * w
    return diff.sum() / weight.sum().clamp(min=1e-6)


def read_at_points(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """B×C×h×w maps read bilinearly at B×P×2 points (x, y in [−1, 1], pixel centres at ±1 like
    ``make_coordinate_grid``; NaN read as the centre, for the caller to mask) → B×C×P. How the landmark
    terms and ``dagan kp-follow`` read the generator's flow and motion mask at face-mesh points."""
    grid = torch.nan_to_num(points.to(maps.dtype)).unsqueeze(2)  # B×P×1×2
    return F.grid_sample(maps, grid, align_corners=True)[..., 0]


def landmark_flow_loss(
    deformation: torch.Tensor,
    lm_source: torch.Tensor,
    lm_driving: torch.Tensor,
    point_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean |flow(lm_d) − lm_s|: the backward flow read at the driving frame's landmarks should
    point at the same landmarks in the source frame.

    deformation: B×h×w×2 backward flow (grid_sample coordinates, x then y, pixel centres at ±1 like
    ``make_coordinate_grid``), read bilinearly at ``lm_driving``; lm_*: B×P×2 in the same frame, NaN
    where there is no face (skipped); point_weights: P. Unlike the keypoint terms this trains the motion
    masks and the occlusion-free part of the warp directly: an upper and a lower lip carried by one
    keypoint cannot move apart, whatever the keypoints do. Returns 0 when no point exists.
    """
    valid = (torch.isfinite(lm_source).all(-1) & torch.isfinite(lm_driving).all(-1)).unsqueeze(-1)
    flow = read_at_points(deformation.float().permute(0, 3, 1, 2), lm_driving).permute(0, 2, 1)  # B×P×2
    return _weighted_point_l1(flow, torch.nan_to_num(lm_source.float()), valid, point_weights)


def landmark_mask_loss(
    mask_logits: torch.Tensor, lm_driving: torch.Tensor, points: Sequence[int]
) -> torch.Tensor:
    """Mean −log m_{k+1}(lm_d,k) over the anchor points k in ``points``: at the driving frame's landmark
    of keypoint k, the motion mask should give keypoint k's own motion.

    mask_logits: B×(K+1)×h×w, the logits of the dense motion's softmax blend weights (channel 0 the
    background, channel k+1 keypoint k), log-softmaxed here and read bilinearly at ``lm_driving`` (B×K×2,
    the anchors, coordinates as in ``landmark_flow_loss``, NaN skipped). Logits, not the mask: the
    bundled masks give some keypoints ~0 everywhere, and −log of a saturated softmax has no gradient, so
    such a channel would never come back. The flow loss alone leaves the carrier free wherever several
    keypoints move alike, which is most pairs: the bundled masks let a mouth-corner or the nose keypoint
    carry the lips and lids, so the lip and lid keypoints' motion reached no lip or lid pixel (``dagan
    kp-follow``). Returns 0 when no point is valid.
    """
    idx = list(points)
    marks = lm_driving[:, idx]  # B×P×2
    valid = torch.isfinite(marks).all(-1)  # B×P
    read = read_at_points(F.log_softmax(mask_logits.float(), dim=1), marks)  # B×(K+1)×P
    own = read[:, [k + 1 for k in idx]].diagonal(dim1=1, dim2=2)  # B×P: channel k+1 at point k
    return -(own * valid).sum() / valid.sum().clamp(min=1)


def landmark_region_mask(landmarks: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """B×1×H×W weights in [0, 1]: the maximum of isotropic Gaussians (std ``sigma`` in the [−1, 1]
    frame) at the given landmarks (B×P×2, NaN points ignored), e.g. the mouth and eyelid points."""
    h, w = size
    ys = torch.linspace(-1.0, 1.0, h, device=landmarks.device)
    xs = torch.linspace(-1.0, 1.0, w, device=landmarks.device)
    marks = landmarks.float()
    valid = torch.isfinite(marks).all(-1)  # B×P
    marks = torch.nan_to_num(marks)
    dy = (ys.view(1, 1, h, 1) - marks[..., 1].view(*marks.shape[:2], 1, 1)) ** 2
    dx = (xs.view(1, 1, 1, w) - marks[..., 0].view(*marks.shape[:2], 1, 1)) ** 2
    g = torch.exp(-(dx + dy) / (2.0 * sigma * sigma)) * valid.view(*valid.shape, 1, 1)  # B×P×H×W
    return g.amax(dim=1, keepdim=True)


def region_l1_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean |prediction − target| (B×3×H×W, mask B×1×H×W); 0 where the mask is empty."""
    diff = (prediction.float() - target.float()).abs().mean(dim=1, keepdim=True)
    return (diff * mask).sum() / mask.sum().clamp(min=1e-6)


# ITU-R BT.601 full range: rows Y, Cb, Cr of an RGB pixel in [0, 1] (Cb, Cr centred on 0).
_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)


def ycbcr(image: torch.Tensor) -> torch.Tensor:
    """B×3×H×W RGB in [0, 1] → B×3×H×W (Y, Cb, Cr), BT.601, float32: luminance for a reader that must
    not see colour (``dagan.cross_motion_gray``), chroma for a colour prior (``chroma_range_loss``)."""
    return torch.einsum("kc,bchw->bkhw", image.new_tensor(_YCBCR).float(), image.float())


def chroma_range_loss(image: torch.Tensor, reference: torch.Tensor, margin: float = 0.02) -> torch.Tensor:
    """Mean over pixels of how far each pixel's chroma (Cb, Cr; ITU-R BT.601) leaves the range the
    reference holds around it: per channel [min(0, local min) − margin, max(0, local max) + margin],
    the local extremes taken over a window of 2·(H // 16) + 1 pixels (17 at 128). image, reference:
    B×3×H×W in [0, 1] → scalar.

    Why: a generator charged by face-api's landmarks on a cross-identity avatar opened its mouths with
    colours the photo never had (a magenta blob, Cb ≈ +0.1; with Cb bounded, a hot pink one), which
    the net reads as a mouth. Neutral colours (a dark mouth, teeth) and the photo's own colours near a
    pixel (lips, a blue background) stay free; the window lets the face move by a few pixels.
    """
    chroma = ycbcr(image)[:, 1:]
    with torch.no_grad():
        ref = ycbcr(reference)[:, 1:]
        k = 2 * (ref.shape[-2] // 16) + 1
        high = F.max_pool2d(ref, k, stride=1, padding=k // 2).clamp(min=0.0) + margin
        low = -F.max_pool2d(-ref, k, stride=1, padding=k // 2).clamp(min=0.0) - margin
    return (torch.relu(chroma - high) + torch.relu(low - chroma)).sum(dim=1).mean()


# ======================================================================================= GAN loss


def lsgan_generator_loss(fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Least-squares GAN, generator side: mean (1 − D(fake))², summed over discriminator scales."""
    return sum(((1 - s.float()) ** 2).mean() for s in fake_scores)


def lsgan_discriminator_loss(
    real_scores: Sequence[torch.Tensor], fake_scores: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Least-squares GAN, discriminator side: mean (1 − D(real))² + D(fake)², summed over scales."""
    return sum(
        ((1 - r.float()) ** 2).mean() + (f.float() ** 2).mean()
        for r, f in zip(real_scores, fake_scores, strict=True)
    )


def feature_matching_loss(
    real_features: Sequence[Sequence[torch.Tensor]], fake_features: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """pix2pixHD feature matching: Σ over scales and discriminator layers of mean |D_l(real) − D_l(fake)|,
    the real side detached (it is a target for the generator)."""
    total = 0.0
    for reals, fakes in zip(real_features, fake_features, strict=True):
        for r, f in zip(reals, fakes, strict=True):
            total = total + (r.detach().float() - f.float()).abs().mean()
    return total


# ================================================================================== equivariance


class RandomTransform:
    """A random smooth warp T of the [-1, 1] image plane: affine + thin-plate spline (per batch item).

    T(z) = A z + b + Σ_k w_k φ(|z − c_k|), φ(r) = r² log r, with A = I + N(0, σ_affine) (2×2), b ~ N(0,
    σ_affine), control points c_k on a ``points × points`` grid over [-1, 1] and 2-D weights w_k ~ N(0,
    σ_tps). T maps a position in the transformed image to the position in the original image it
    shows, i.e. I_T(z) = I(T(z)), which is what ``grid_sample`` needs; a keypoint x of I therefore
    appears in I_T at the z with T(z) = x, and equivariance asks T(kp(I_T)) = kp(I).

    All parameters are drawn from ``generator`` so that a training step is reproducible on resume.
    """

    def __init__(
        self,
        batch: int,
        sigma_affine: float = 0.05,
        sigma_tps: float = 0.005,
        points: int = 5,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        noise = torch.randn(batch, 2, 3, generator=generator) * sigma_affine
        self.affine = (noise + torch.eye(2, 3)).to(device)  # B×2×3
        self.control_points = make_coordinate_grid(points, points).view(-1, 2).to(device)  # P×2
        self.control_params = (torch.randn(batch, points * points, 2, generator=generator) * sigma_tps).to(
            device
        )  # B×P×2

    def warp_coordinates(self, coords: torch.Tensor) -> torch.Tensor:
        """coords B×N×2 (x, y) → T(coords) B×N×2."""
        coords = coords.float()
        a, b = self.affine[:, :, :2], self.affine[:, :, 2]
        out = coords @ a.transpose(1, 2) + b[:, None]
        diff = coords[:, :, None, :] - self.control_points[None, None]  # B×N×P×2
        r2 = (diff**2).sum(-1)
        phi = 0.5 * r2 * torch.log(r2 + 1e-9)  # r² log r
        return out + phi @ self.control_params

    def jacobian(self, coords: torch.Tensor) -> torch.Tensor:
        """dT/dz at coords B×N×2 → B×N×2×2 (analytic: A + Σ_k w_k (2 log r_k + 1)(z − c_k)ᵀ)."""
        coords = coords.float()
        diff = coords[:, :, None, :] - self.control_points[None, None]  # B×N×P×2
        r2 = (diff**2).sum(-1)
        coef = torch.log(r2 + 1e-9) + 1.0  # 2 log r + 1
        # Σ_k w_k ⊗ coef_k diff_k : B×N×2×2 with [i, j] = Σ_k w_k,i coef_k diff_k,j
        tps = torch.einsum("bpi,bnp,bnpj->bnij", self.control_params, coef, diff)
        return self.affine[:, None, :, :2] + tps

    def sampling_grid(self, h: int, w: int) -> torch.Tensor:
        """B×H×W×2: T at every pixel of an H×W frame (the keypoints' align_corners=True frame), where
        I_T reads I."""
        b = self.affine.shape[0]
        grid = make_coordinate_grid(h, w, like=self.affine).view(1, h * w, 2).expand(b, -1, -1)
        return self.warp_coordinates(grid).view(b, h, w, 2)

    def inside(self, h: int, w: int) -> torch.Tensor:
        """B×1×H×W: 1 where I_T shows the image itself, 0 where T(z) leaves [-1, 1]² and
        :meth:`transform_frame` shows its mirror (reflection padding)."""
        return (self.sampling_grid(h, w).abs() <= 1).all(dim=-1).to(self.affine.dtype).unsqueeze(1)

    def transform_frame(self, image: torch.Tensor) -> torch.Tensor:
        """I_T(z) = I(T(z)) for B×C×H×W images (stack two frames along C to warp both by one grid)."""
        warped = self.sampling_grid(*image.shape[-2:])
        return F.grid_sample(
            image, warped.to(image.dtype), mode="bilinear", padding_mode="reflection", align_corners=True
        )


def equivariance_losses(
    kp_value: torch.Tensor,
    kp_jacobian: torch.Tensor | None,
    kp_t_value: torch.Tensor,
    kp_t_jacobian: torch.Tensor | None,
    transform: RandomTransform,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Equivariance (paper eq. 12, FOMM): keypoints of I vs keypoints of I_T mapped back by T.

    kp_value B×K×2 (of I), kp_t_value B×K×2 (of I_T), Jacobians B×K×2×2 or None. Returns
    (mean |x − T(x_T)|, mean |1 − J⁻¹ · dT(x_T) · J_T| or None without Jacobians). The value term is
    the mean rather than eq. 12's sum over K, so its scale does not depend on the number of keypoints.
    """
    value = (kp_value.float() - transform.warp_coordinates(kp_t_value)).abs().mean()
    if kp_jacobian is None or kp_t_jacobian is None:
        return value, None
    mapped = transform.jacobian(kp_t_value) @ kp_t_jacobian.float()  # B×K×2×2
    product = inverse_2x2(kp_jacobian.float()) @ mapped
    eye = torch.eye(2, dtype=product.dtype, device=product.device)
    return value, (eye - product).abs().mean()


def keypoint_distance_loss(
    kp_value: torch.Tensor, threshold: float = 0.2, exempt: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoint distance loss L_D (paper eq. 13) for keypoints B×K×2; returns (loss, eq. 13 value).

    Eq. 13 charges 1 − sign(‖x_i − x_j‖₁ − α) per pair i ≠ j: 2 for a pair closer than α, 0 otherwise.
    A sign has zero gradient everywhere, so optimised as written it would never move a keypoint. The
    returned loss is its hinge form, 2·max(0, 1 − ‖x_i − x_j‖₁/α): equal to eq. 13 at distance 0 and
    from α on, linear in between, so it pushes crowded pairs apart. Both are averaged over pairs and
    batch (eq. 13 sums; the mean keeps the scale independent of K). The second value is eq. 13 itself
    (no gradient), for logging.

    ``exempt`` (B×K×K bool) drops pairs from the hinge: with the landmark prior, keypoints anchored to an
    upper and a lower lip are meant to be close, and eq. 13 would push them off the lips.
    """
    kp = kp_value.float()
    k = kp.shape[1]
    if k < 2:
        zero = kp.new_zeros(())
        return zero, zero
    dist = (kp[:, :, None, :] - kp[:, None, :, :]).abs().sum(-1)  # B×K×K, L1
    off_diag = ~torch.eye(k, dtype=torch.bool, device=kp.device)
    keep = off_diag.expand(kp.shape[0], k, k)
    if exempt is not None:
        keep = keep & ~exempt
    hinge = 2.0 * torch.clamp(1.0 - dist / max(threshold, 1e-12), min=0.0)
    with torch.no_grad():
        sign_form = (1.0 - torch.sign(dist[:, off_diag] - threshold)).mean()
    return (hinge * keep).sum() / (kp.shape[0] * k * (k - 1)), sign_form


def gradient_norm(parameters) -> float:
    """Global L2 norm of the gradients (for logging when clipping is off)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


__all__ = [
    "RandomTransform",
    "edge_aware_smoothness",
    "equivariance_losses",
    "feature_matching_loss",
    "keypoint_distance_loss",
    "landmark_flow_loss",
    "landmark_mask_loss",
    "landmark_motion_loss",
    "landmark_prior_loss",
    "landmark_region_mask",
    "lsgan_discriminator_loss",
    "lsgan_generator_loss",
    "photometric_error",
    "read_at_points",
    "region_l1_loss",
    "reprojection_loss",
    "ssim_distance",
]
