"""What each built-in model is and needs, without importing it: the one source of ``cloudfree models`` and of the
README's model table (``cloudfree models --markdown`` prints that table).

Importing a model module can import torch (the learned models), about a second per process; listing the models
must not. The entries repeat what each model's :class:`~cloudfree.models.base.ModelSpec` declares with its default
parameters (level, halo, references, SAR); ``tests/test_registry.py`` builds every model and fails when an
entry no longer matches its spec. Plug-in models (entry points) are listed from their own spec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSummary:
    name: str
    what: str
    level: str
    halo: int
    needs_reference: bool = False
    max_references: int = 0
    needs_sar: bool = False
    accepts_sar: bool = False
    #: what the "needs" column adds to the flags (e.g. which pixels need a reference)
    note: str = ""
    #: why it is experimental (``ModelSpec.experimental``: run refuses it without ``model.allow_experimental``)
    experimental: str = ""

    @property
    def needs(self) -> str:
        """The "needs" column, from the spec's flags."""
        parts = []
        if self.needs_reference:
            parts.append("references (at least one)")
        elif self.max_references:
            parts.append(f"uses up to {self.max_references} references when given")
        if self.needs_sar:
            parts.append("Sentinel-1")
        elif self.accepts_sar:
            parts.append("uses Sentinel-1 when configured")
        text = "; ".join(parts) or "nothing extra"
        text = f"{text} ({self.note})" if self.note else text
        return f"{text}; EXPERIMENTAL: {self.experimental}" if self.experimental else text


_BELOW = ("shipped weights below the mean-fill floor on the real Romania evaluation; needs "
          "model.allow_experimental")


BUILTIN_SUMMARIES: tuple[ModelSummary, ...] = (
    ModelSummary("temporal", "per pixel, the clear references interpolated in time at the target's date (linear "
                 "between the bracketing dates; a robust Huber/Tukey line when there are more), aligned to the "
                 "target per reference and then by a smooth local gain/offset field", "any", 81,
                 needs_reference=True, max_references=8, note="dated"),
    ModelSummary("temporal-ssl", "temporal + an offset-free, centred residual learned per scene on its own clear pixels "
                 "(pseudo-clouds from real masks, boosted trees, shrunk by held-out pixels)", "any", 81,
                 needs_reference=True, max_references=8, note="dated"),
    ModelSummary("temporal-residual", "temporal + a full-resolution residual network (per-pixel temporal attention + "
                 "dilated MBConv, band-agnostic, small CPU-trained weights `models/weights/temporal_residual.card.md`) "
                 "whose head is refitted per scene on pseudo-clouds and shrunk by its cross-fitted gain", "any", 97,
                 needs_reference=True, max_references=8, note="dated",
                 experimental="below temporal on slovakia (40.04 vs 41.97 dB) though at or above it on "
                              "romania-hidden, romania-real and simulated"),
    ModelSummary("reference-replace", "masked pixels from the best clear reference after a per-band linear "
                 "radiometric alignment fitted once per scene", "any", 0, needs_reference=True, max_references=4),
    ModelSummary("median-composite", "per-pixel median (or nearest-in-time clear) of all clear observations, what "
                 "odc-stac users do", "any", 0, needs_reference=True, max_references=8),
    ModelSummary("dcp", "dark channel prior (He et al.) thin-cloud/haze removal", "any", 47),
    ModelSummary("phyvlm-cr", "PhyVLM-CR (Xu, Li, Shen): scattering-model inversion gated by a confidence map, fused "
                 "with a reference, eqs. 1–11; the VLM prior is pluggable: `temporal` (default: the temporal "
                 "model's estimate, also used as I_ref), `reference` (aligned reference composite), `model` "
                 "(another registered model's output, e.g. a baseline or one of the learned models below; named for "
                 "what it wraps), a local `diffusers` pipeline", "any", 123, max_references=4,
                 note="thick cloud stays unfilled without one"),
    ModelSummary("ca-mtcr", "CA-MTCR (You et al. 2026), learned, rebuilt at full resolution: per-pixel "
                 "change-aware attention over the aligned reference pixels (change scores against the target's "
                 "clear surroundings; a SAR change channel when Sentinel-1 is given) + a residual conv head; small "
                 "CPU-trained weights (`models/weights/ca_mtcr.card.md`)", "L2A", 32, max_references=4,
                 accepts_sar=True),
    ModelSummary("sar-optical-fusion", "cloud-attentive SAR-optical network (Bui et al.), learned: RDB + Swin "
                 "fusion, GFF, IRN, cloud-weighted loss; small CPU-trained weights "
                 "(`models/weights/sar_optical_fusion.card.md`)", "L2A", 16, needs_sar=True, accepts_sar=True,
                 note="`require_sar: false` runs it optical-only, below mean-fill", experimental=_BELOW),
    ModelSummary("diffusion-enhancement", "Diffusion Enhancement (Sui et al.): DDIM conditional noise predictor "
                 "fused with any registered reference model (PhyVLM-CR by default) through the Weight Allocation "
                 "network, eqs. 1–15; `steps` (50)", "L2A", 171, max_references=4,
                 note="and what its reference model needs"),
    ModelSummary("cm-cr", "CM-CR: SAR-conditioned EDM teacher distilled into a one-step consistency student + "
                 "multistep resampling; 1 step of the student's EMA by default; `steps`, `sampler: student/teacher`", "L2A",
                 48, needs_sar=True, accepts_sar=True,
                 note="`require_sar: false` runs it optical-only, below mean-fill", experimental=_BELOW),
    ModelSummary("mean-fill", "floor: cloudy pixels take the per-band mean of the clear pixels (a constant)", "any", 0),
    ModelSummary("none", "no removal (the floor every model must beat)", "any", 0),
)


def default_model() -> str:
    """The config's default ``model.name`` (pipeline.config.ModelConfig), the single place it is set."""
    from cloudfree.pipeline.config import ModelConfig

    return ModelConfig.model_fields["name"].default


def summaries(plugins: bool = True) -> list[ModelSummary]:
    """Built-ins from the table above (nothing imported); plug-ins from their class's spec."""
    out = list(BUILTIN_SUMMARIES)
    if plugins:
        from importlib.metadata import entry_points

        known = {s.name for s in out}
        for ep in entry_points(group="cloudfree.models"):
            if ep.name in known:
                continue
            try:
                s = ep.load().spec
            except Exception as exc:  # noqa: BLE001 - a broken plug-in is listed, not fatal
                out.append(ModelSummary(ep.name, f"plug-in {ep.value} (failed to load: {exc})", "?", 0))
                continue
            out.append(ModelSummary(ep.name, s.description, s.level, s.halo, s.needs_reference, s.max_references,
                                    s.needs_sar, s.accepts_sar, note=f"plug-in {ep.value}"))
    return out


def markdown_table(rows: list[ModelSummary] | None = None) -> str:
    """The README's model table."""
    default = default_model()
    lines = ["| name | what | needs |", "|---|---|---|"]
    for s in rows or list(BUILTIN_SUMMARIES):
        name = f"`{s.name}`" + (" (default)" if s.name == default else "")
        lines.append(f"| {name} | {s.what} | {s.needs} |")
    return "\n".join(lines) + "\n"


def text_listing(rows: list[ModelSummary] | None = None) -> str:
    """What ``cloudfree models`` prints."""
    default = default_model()
    out = []
    for s in rows if rows is not None else summaries():
        mark = " (default)" if s.name == default else ""
        out.append(f"{s.name + mark:30s} {s.what}")
        out.append(f"{'':30s} level {s.level}, halo {s.halo} px, needs: {s.needs}")
    return "\n".join(out)
