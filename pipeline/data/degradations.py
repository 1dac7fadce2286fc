"""Named image degradations ``y = A(x)``: the source side of paired data, and the measurement
operators a data-consistent solver projects onto.

Images are float (B, 3, H, W) in [-1, 1] (DESIGN.md §3). A spec names one operator and maybe
its parameter: ``grayscale`` (BT.601 luma), ``edges`` (Sobel magnitude), ``canny`` (Canny 1986),
``down2`` / ``down4`` (box average), ``blur`` or ``blur:SIGMA`` (Gaussian, SIGMA px, default
1.5, circular so the FFT inverts it exactly), ``mask`` or ``mask:FRACTION`` (a random rectangle of
that share of the area hidden, default 0.25), ``outpaint`` or ``outpaint:SIDE`` (the half of the
image on SIDE hidden: left, right, top, bottom, or ``any`` side drawn per image, the default).

Every operator gives the measurement (:meth:`Degradation.measure`, differentiable except
canny's thresholds) and the model's source image (:meth:`Degradation.source`: y shown as an
image at x's size). The linear ones also give the L2-nearest image consistent with a
measurement (:meth:`Degradation.project`): the projection step of data-consistent diffusion
solvers (DDRM, Kawar et al. 2022; DDNM, Wang et al. 2023: ``x' = x + A⁺(y − A x)``). The
Gaussian's pseudo-inverse is Tikhonov-regularised (``tikhonov``): the default 1e-2 is for the
measurements users hold, 8-bit images, whose rounding the exact inverse (1e-10 in float64) would
amplify into noise; on the demo's 8-bit blurred renders the solver then reaches 38 dB (1e-3: 31,
1e-4: 24, 1e-10: 6). Where a measurement is exact (a float ``A(x)``), ``dataclasses.replace`` it
lower.

References: Canny, "A Computational Approach to Edge Detection", TPAMI 1986; ITU-R BT.601 luma
weights; Kawar et al., "Denoising Diffusion Restoration Models", NeurIPS 2022; Wang et al.,
"Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model", ICLR 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEGRADATIONS = ("grayscale", "edges", "canny", "down2", "down4", "blur", "mask", "outpaint")
LINEAR = ("grayscale", "down2", "down4", "blur", "mask", "outpaint")
LUMA = (0.299, 0.587, 0.114)  # BT.601
OUTPAINT_SIDES = ("any", "left", "right", "top", "bottom")
DEFAULTS = {"blur": 1.5, "mask": 0.25, "outpaint": "any"}
CANNY_SIGMA, CANNY_LOW, CANNY_HIGH = 1.0, 0.02, 0.05  # smoothing px; thresholds on |∇luma| / 4 in [0, 1] units
EDGE_SCALE = 8.0  # Sobel magnitude of a full black-to-white step on [-1, 1] pixels: the edge map's 1


@dataclass(frozen=True)
class Degradation:
    """One operator ``A``: ``spec`` as given, ``name`` one of :data:`DEGRADATIONS`, ``param`` its
    parameter (blur σ in px, mask's hidden fraction, outpaint's side; None for the others)."""

    spec: str
    name: str
    linear: bool
    param: float | str | None = None
    tikhonov: float = 1e-2  # blur's projection: |K|² + this in the denominator (float64); see the module docstring

    # ------------------------------------------------------------------ the operator

    def measure(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``y = A(x)``: grayscale (B, 1, H, W) luma; downN (B, 3, H/N, W/N); blur (B, 3, H, W);
        mask/outpaint (B, 3, H, W) ``x · keep``; edges/canny (B, 1, H, W) in [-1, 1]."""
        if self.name == "grayscale":
            return (x * _luma(x)).sum(1, keepdim=True)  # (B, 1, H, W)
        if self.name in ("down2", "down4"):
            return F.avg_pool2d(x, self._factor(x))  # (B, 3, H/N, W/N)
        if self.name == "blur":
            return _fft_filter(x, _gaussian_transfer(x.shape[-2], x.shape[-1], self.param, x.device, x.dtype))
        if self.name in ("mask", "outpaint"):
            return x * self._keep(mask, x)
        magnitude = sobel_magnitude(luma(x)) if self.name == "edges" else canny(luma(x))
        return (magnitude.clamp(0, 1) * 2 - 1)  # (B, 1, H, W)

    def source(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's source image at x's size, (B, 3, H, W) in [-1, 1]: y shown as an image
        (downN: bicubic up to H×W; one-channel maps on 3 channels; hidden pixels 0, mid grey)."""
        y = self.measure(x, mask)
        if y.shape[1] == 1:
            return y.expand(-1, 3, -1, -1).contiguous()  # (B, 3, H, W)
        if y.shape[-2:] != x.shape[-2:]:
            return F.interpolate(y, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        return y

    def project(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The L2-nearest ``x'`` to ``x`` with ``A(x') = y`` (linear operators only):
        ``x + A⁺(y − A x)``; x itself when it already meets y."""
        if not self.linear:
            raise ValueError(f"degradation {self.spec!r} is not linear: it has no projection (linear ones: {', '.join(LINEAR)})")
        if self.name in ("mask", "outpaint"):
            keep = self._keep(mask, x)
            return keep * y + (1 - keep) * x
        residual = y - self.measure(x, mask)
        if self.name == "grayscale":
            w = _luma(x)  # (1, 3, 1, 1)
            return x + w * residual / (w * w).sum()
        if self.name in ("down2", "down4"):
            return x + F.interpolate(residual, scale_factor=self._factor(x), mode="nearest")
        transfer = _gaussian_transfer(x.shape[-2], x.shape[-1], self.param, x.device, torch.float64)
        inverse = transfer / (transfer * transfer + self.tikhonov)  # real, symmetric: conj(K) = K
        return x + _fft_filter(residual.double(), inverse).to(x.dtype)

    def masks(self, count: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """(count, 1, H, W) float masks, 1 = kept pixel, drawn with ``generator`` for mask and
        outpaint; None for the others."""
        if self.name == "mask":
            return torch.stack([_rectangle_mask(self.param, height, width, generator) for _ in range(count)])
        if self.name == "outpaint":
            sides = OUTPAINT_SIDES[1:]
            picks = torch.randint(len(sides), (count,), generator=generator).tolist()
            chosen = [sides[i] if self.param == "any" else self.param for i in picks]
            return torch.stack([_half_mask(side, height, width) for side in chosen])
        return None

    # ------------------------------------------------------------------ helpers

    def _factor(self, x: torch.Tensor) -> int:
        factor = int(self.name[-1])
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"{self.spec}: image size {tuple(x.shape[-2:])} is not a multiple of {factor}")
        return factor

    def _keep(self, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if mask is None:
            raise ValueError(f"{self.spec} needs a mask (Degradation.masks draws one)")
        return mask.to(x.dtype)


def parse_degradation(spec: str) -> Degradation:
    """``"grayscale"``, ``"blur:2"``, ``"outpaint:left"``… -> a :class:`Degradation`; ValueError (one
    line naming the known ones) for anything else."""
    text = str(spec).strip()
    name, _, value = text.partition(":")
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {spec!r}: known ones are {', '.join(DEGRADATIONS)} "
                         "(blur:SIGMA, mask:FRACTION, outpaint:SIDE take a parameter)")
    if name not in DEFAULTS:
        if value:
            raise ValueError(f"degradation {name} takes no parameter (got {spec!r})")
        return Degradation(spec=text, name=name, linear=name in LINEAR)
    return Degradation(spec=text, name=name, linear=True, param=_parameter(name, value, spec))


def parse_degradations(text: str) -> list[Degradation]:
    """``"grayscale,down4"`` -> one :class:`Degradation` each (ValueError when none or one is unknown)."""
    specs = [s.strip() for s in str(text).split(",") if s.strip()]
    if not specs:
        raise ValueError(f"no degradation given (known ones: {', '.join(DEGRADATIONS)})")
    return [parse_degradation(s) for s in specs]


def consistency_error(deg: Degradation, x_hat: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) RMS of ``A(x_hat) − y`` in [0, 1] pixel units (the [-1, 1] difference halved)."""
    diff = (deg.measure(x_hat, mask) - y).float() / 2
    return diff.flatten(1).pow(2).mean(1).sqrt()


# ---------------------------------------------------------------------------- parameters and masks


def _parameter(name: str, value: str, spec: str) -> float | str:
    if not value:
        return DEFAULTS[name]
    if name == "outpaint":
        if value not in OUTPAINT_SIDES:
            raise ValueError(f"outpaint:SIDE needs SIDE in {', '.join(OUTPAINT_SIDES)} (got {spec!r})")
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    valid = number > 0 if name == "blur" else 0 < number < 1
    if not valid:
        what = "blur:SIGMA needs SIGMA > 0 (pixels)" if name == "blur" else "mask:FRACTION needs 0 < FRACTION < 1"
        raise ValueError(f"{what} (got {spec!r})")
    return number


def _rectangle_mask(fraction: float, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """(1, H, W): ones with a rectangle of about ``fraction`` of the area (aspect in [1/2, 2]) at zero."""
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    aspect = 2.0 ** (2 * u[0] - 1)  # w / h
    h = min(height, max(1, round(math.sqrt(fraction * height * width / aspect))))
    w = min(width, max(1, round(fraction * height * width / h)))
    top, left = int(u[1] * (height - h + 1)), int(u[2] * (width - w + 1))
    keep = torch.ones(1, height, width)
    keep[:, top : top + h, left : left + w] = 0
    return keep


def _half_mask(side: str, height: int, width: int) -> torch.Tensor:
    """(1, H, W): the half on ``side`` hidden (zero), the other half kept."""
    keep = torch.ones(1, height, width)
    hidden = {"left": (slice(None), slice(0, width // 2)), "right": (slice(None), slice(width - width // 2, None)),
              "top": (slice(0, height // 2), slice(None)), "bottom": (slice(height - height // 2, None), slice(None))}[side]
    keep[(slice(None), *hidden)] = 0
    return keep


# ---------------------------------------------------------------------------- filters


def _luma(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) BT.601 luma, same range as x."""
    return (x * _luma(x)).sum(1, keepdim=True)


def _gaussian_transfer(height: int, width: int, sigma: float, device, dtype) -> torch.Tensor:
    """The rfft2 transfer function (H, W//2+1) of a circular, normalised Gaussian of σ px."""
    def axis(n: int) -> torch.Tensor:
        radius = max(1, math.ceil(4 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.zeros(n, dtype=torch.float64).index_add_(0, offsets.long() % n, torch.exp(-offsets**2 / (2 * sigma**2)))
        return torch.fft.fft(kernel / kernel.sum()).real  # symmetric kernel: real spectrum
    transfer = axis(height)[:, None] * axis(width)[None, : width // 2 + 1]  # (H, W//2+1)
    return transfer.to(device=device, dtype=dtype)


def _fft_filter(x: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    """Circular convolution of x (..., H, W) with the filter whose rfft2 is ``transfer``."""
    return torch.fft.irfft2(torch.fft.rfft2(x) * transfer, s=x.shape[-2:])


_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) -> gradients (gx right − left, gy down − up), edge-replicated borders."""
    kx = torch.tensor(_SOBEL_X, dtype=gray.dtype, device=gray.device).view(1, 1, 3, 3)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(-1, -2))


def sobel_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma in [-1, 1] -> |∇| scaled so a full black-to-white step is 1 (not clamped)."""
    gx, gy = sobel(gray)
    return torch.sqrt(gx * gx + gy * gy + 1e-12) / EDGE_SCALE


def canny(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma in [-1, 1] -> binary edges {0, 1} (Canny 1986): Gaussian smoothing, Sobel,
    non-maximum suppression across the edge, double threshold, hysteresis."""
    smooth = _fft_filter(gray, _gaussian_transfer(gray.shape[-2], gray.shape[-1], CANNY_SIGMA, gray.device, gray.dtype))
    gx, gy = sobel(smooth)
    magnitude = torch.sqrt(gx * gx + gy * gy) / EDGE_SCALE  # a full step in [0, 1] units: 1 before smoothing
    thin = magnitude * _is_ridge(magnitude, gx, gy)
    weak, edges = thin >= CANNY_LOW, thin >= CANNY_HIGH
    for _ in range(gray.shape[-2] * gray.shape[-1]):  # hysteresis: grow strong edges along weak ones
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(gray.dtype)


def _is_ridge(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Non-maximum suppression: 1 where the magnitude is >= both neighbours along the gradient
    direction (quantised to 0°, 45°, 90°, 135°)."""
    h, w = magnitude.shape[-2:]
    padded = F.pad(magnitude, (1, 1, 1, 1))
    at = lambda dy, dx: padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731
    direction = torch.remainder(torch.round(torch.atan2(gy, gx) / (math.pi / 4)), 4).long()  # (B, 1, H, W)
    ridge = torch.zeros_like(magnitude, dtype=torch.bool)
    for d, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        top = (magnitude >= at(dy, dx)) & (magnitude >= at(-dy, -dx))
        ridge |= (direction == d) & top
    return ridge.to(magnitude.dtype)
