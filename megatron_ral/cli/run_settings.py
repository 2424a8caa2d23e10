"""The data and generation settings a model tool uses, and where each came from.

A checkpoint is evaluated as it was trained: the tools (evaluate, generate, dump_attention,
visualize_attention, export_hf) start from the configuration the checkpoint keeps
(``iter_N/run_config.yaml``, else its run's ``config.yaml``; see ``megatron_ral.checkpoint.run_config``).
``--config FILE`` replaces it, ``section.key=value`` overrides and the tools' own flags win over both.
:func:`settings_report` states the settings used and, per key, their source: ``flag``, ``override``,
``--config FILE``, ``checkpoint FILE`` or ``default`` (no kept configuration: the built-in defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The keys that decide a model's inputs and responses (reported by the tools).
DATA_KEYS = ("template", "system_prompt", "fps", "min_frames", "max_frames", "video_min_pixels", "video_max_pixels",
             "video_total_pixels", "max_video_tokens", "image_min_pixels", "image_max_pixels", "media_root")
GENERATION_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")


@dataclass
class RunSettings:
    """A configuration for a model tool: ``cfg`` (typed Config, not validated), ``base`` (where its values
    come from: ``--config FILE``, ``checkpoint FILE`` or ``default``) and the per-key sources that differ."""

    cfg: object
    base: str
    config_path: str | None
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, dotted: str, value, source: str = "flag") -> None:
        """Set ``section.key`` (a tool flag's value) and record its source."""
        section, key = dotted.split(".", 1)
        setattr(getattr(self.cfg, section), key, value)
        self.sources[dotted] = source

    def source(self, dotted: str) -> str:
        return self.sources.get(dotted, self.base)


def load_settings(ckpt: str | Path, config: str | None, overrides=(), dist_dir: str | Path | None = None
                  ) -> RunSettings:
    """The tool's starting configuration: ``config`` when given, else the one ``ckpt`` (or its resolved
    ``dist_dir``) keeps, else the defaults; then ``overrides`` (``section.key=value``)."""
    from megatron_ral.checkpoint.run_config import find_run_config
    from megatron_ral.config import load_config
    from megatron_ral.config.loader import parse_override

    if config is not None:
        path, base = str(config), f"--config {config}"
    else:
        kept = next((p for p in (find_run_config(d) for d in (dist_dir, ckpt) if d is not None) if p), None)
        path, base = (str(kept), f"checkpoint {kept}") if kept is not None else (None, "default")
    cfg = load_config(path, list(overrides))
    sources = {parse_override(o)[0]: "override" for o in overrides}
    return RunSettings(cfg, base, path, sources)


def settings_report(settings: RunSettings) -> dict:
    """``{"config": FILE or None, "data": {key: value}, "generation": {...}, "source": {dotted: source}}``."""
    cfg = settings.cfg
    data = {k: getattr(cfg.data, k) for k in DATA_KEYS}
    gen = {k: getattr(cfg.generation, k) for k in GENERATION_KEYS}
    source = {f"data.{k}": settings.source(f"data.{k}") for k in DATA_KEYS}
    source.update({f"generation.{k}": settings.source(f"generation.{k}") for k in GENERATION_KEYS})
    return {"config": settings.config_path, "data": data, "generation": gen, "source": source}


def media_budget(data_cfg, kind: str) -> dict:
    """``preprocess_single`` keywords of ``data_cfg``'s budgets for one ``image`` / ``video``."""
    if kind == "image":
        return {"min_pixels": data_cfg.image_min_pixels, "max_pixels": data_cfg.image_max_pixels}
    return {"fps": data_cfg.fps, "min_frames": data_cfg.min_frames, "max_frames": data_cfg.max_frames,
            "min_pixels": data_cfg.video_min_pixels, "max_pixels": data_cfg.video_max_pixels,
            "total_pixels": data_cfg.video_total_pixels}


__all__ = ["DATA_KEYS", "GENERATION_KEYS", "RunSettings", "load_settings", "media_budget", "settings_report"]
