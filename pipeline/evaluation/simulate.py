"""SIMULATED clouds and shadows on real clear pixels, by the scattering model I = J t + A (1 - t).

Everything produced here is simulated and must be labelled so in item properties and reports
(``cloudfree:simulated = true``). Pure numpy, seeded, so tests and evaluations are reproducible.

The optical thickness field is fractal (sum of Gaussian-smoothed white noise over octaves, a 1/f-like spectrum
that resembles cloud fields), shaped so that a chosen fraction of the scene is cloudy and part of that is thick.
Transmission ``t = exp(-tau)`` is spatially varying and continuous, so thin and thick cloud are two ends of one
field, as in the PhyVLM-CR paper's motivation. Shadows are the thick-cloud opacity displaced along the
(simulated) sun azimuth, darkening the surface multiplicatively before the cloud is added on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: Simulated cloud-top reflectance (atmospheric light A) per band: bright and flat in the visible/NIR, darker in
#: SWIR, where water/ice absorb (typical thick-cloud TOA reflectances). Bands not listed get 0.8.
CLOUD_ALBEDO = {
    "B01": 0.82, "B02": 0.83, "B03": 0.83, "B04": 0.84, "B05": 0.84, "B06": 0.84, "B07": 0.84,
    "B08": 0.84, "B8A": 0.84, "B09": 0.5, "B10": 0.35, "B11": 0.62, "B12": 0.48,
}
#: Spectral exponent of transmission per band (t_b = t ** k_b): slightly stronger extinction at short wavelengths.
SPECTRAL_K = {"B01": 1.08, "B02": 1.06, "B03": 1.03, "B04": 1.0, "B11": 0.95, "B12": 0.93}


@dataclass(frozen=True)
class CloudSpec:
    """Knobs of one simulated cloud field."""

    #: fraction of pixels with noticeable cloud (t < 0.95).
    cover: float = 0.45
    #: fraction of the cloudy pixels that are thick (t < 0.1, surface practically lost).
    thick_fraction: float = 0.4
    #: correlation length of the largest cloud structures, pixels.
    scale: float = 96.0
    #: shadow displacement (pixels, dy, dx) and darkening strength in [0, 1].
    shadow_offset: tuple[int, int] = (18, 26)
    shadow_strength: float = 0.6
    #: Gaussian sensor noise (reflectance units).
    noise: float = 0.002
    albedo: dict[str, float] = field(default_factory=lambda: dict(CLOUD_ALBEDO))


@dataclass
class SimulatedClouds:
    cloudy: np.ndarray  #: (band, y, x) float32, the simulated observation I
    transmission: np.ndarray  #: (y, x) float32 t in [0, 1] (band-independent part)
    shadow: np.ndarray  #: (y, x) float32 multiplicative shadow factor (1 = no shadow)
    atmospheric_light: np.ndarray  #: (band,) float32 A
    cloud_probability: np.ndarray  #: (y, x) float32 0-100, a simulated MSK_CLDPRB-like layer
    spec: CloudSpec

    @property
    def thick(self) -> np.ndarray:
        return self.transmission < 0.1

    @property
    def thin(self) -> np.ndarray:
        return (self.transmission >= 0.1) & (self.transmission < 0.95)


def fractal_field(shape: tuple[int, int], scale: float, rng: np.random.Generator, octaves: int = 5) -> np.ndarray:
    """Zero-mean, unit-variance 1/f-like random field (sum of smoothed noise, amplitude halving per octave)."""
    out = np.zeros(shape, np.float64)
    amp, s = 1.0, scale
    for _ in range(octaves):
        n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(s / 4, 0.5), mode="wrap")
        out += amp * n / (n.std() + 1e-12)
        amp *= 0.5
        s /= 2
    return ((out - out.mean()) / (out.std() + 1e-12)).astype(np.float32)


def optical_thickness(shape: tuple[int, int], spec: CloudSpec, rng: np.random.Generator) -> np.ndarray:
    """tau >= 0 with ``spec.cover`` of pixels above tau(t=0.95) and ``cover*thick_fraction`` above tau(t=0.1)."""
    f = fractal_field(shape, spec.scale, rng)
    tau_thin, tau_thick = -np.log(0.95), -np.log(0.1)
    q_cloud = np.quantile(f, 1 - spec.cover) if spec.cover > 0 else np.inf
    q_thick = np.quantile(f, 1 - spec.cover * spec.thick_fraction) if spec.cover * spec.thick_fraction > 0 else np.inf
    tau = np.zeros(shape, np.float32)
    if np.isfinite(q_cloud):
        # piecewise-linear map of the field onto tau: q_cloud -> tau_thin, q_thick -> tau_thick, steeper above
        slope = (tau_thick - tau_thin) / max(q_thick - q_cloud, 1e-6) if np.isfinite(q_thick) else 1.0
        tau = np.where(f > q_cloud, tau_thin + slope * (f - q_cloud), tau_thin * np.exp((f - q_cloud) * 3))
    return np.maximum(tau, 0).astype(np.float32)


def simulate_clouds(
    clear: np.ndarray,
    bands: tuple[str, ...] | list[str],
    spec: CloudSpec | None = None,
    seed: int = 0,
) -> SimulatedClouds:
    """Add SIMULATED cloud and shadow to ``clear`` ``(band, y, x)`` reflectance (0-1 scale)."""
    spec = spec or CloudSpec()
    rng = np.random.default_rng(seed)
    _, ny, nx = clear.shape
    tau = optical_thickness((ny, nx), spec, rng)
    t = np.exp(-tau).astype(np.float32)
    # shadow: opacity of the cloud displaced along the sun direction, applied to the surface
    opacity = 1 - t
    dy, dx = spec.shadow_offset
    shifted = ndimage.shift(opacity, (dy, dx), order=1, mode="constant", cval=0.0)
    shadow = (1 - spec.shadow_strength * np.clip(shifted, 0, 1)).astype(np.float32)
    a = np.array([spec.albedo.get(b, 0.8) for b in bands], np.float32)
    cloudy = np.empty_like(clear, dtype=np.float32)
    for i, b in enumerate(bands):
        tb = t ** SPECTRAL_K.get(b, 1.0)
        cloudy[i] = clear[i] * shadow * tb + a[i] * (1 - tb)
    cloudy += rng.normal(0, spec.noise, cloudy.shape).astype(np.float32)
    # MSK_CLDPRB-like: opacity in percent, blurred to 20 m character, with detector-like noise
    prob = ndimage.gaussian_filter(opacity, 1.0) * 100 + rng.normal(0, 3, opacity.shape)
    prob = np.clip(prob, 0, 100).astype(np.float32)
    return SimulatedClouds(cloudy, t, shadow, a, prob, spec)
