"""Reading a config: YAML parsed with bounds on size and depth, overrides applied, the schema validated,
and every error located at the file and line (or the override) its key came from."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from multitune.config.rules import check_numbers
from multitune.config.schema import (
    PACKAGE_PREFIX,
    SPLITS,
    Config,
    DiscoverConfig,
    SourceConfig,
    TaskConfig,
    known_keys,
)
from multitune.errors import ConfigError

# Bounds on what one YAML text may expand to. Aliases make a small text stand for a huge tree (nine
# levels of nine aliases: 9^9 values from 342 bytes) or an infinite one (an alias inside its own anchor);
# PyYAML builds them as shared objects, but every reader that walks the tree pays for the expansion.
# A hand-written config is a few hundred values, a few levels deep.
Check = Callable[[Config], None]  # a check a valid config must also pass; raises ConfigError with a field
Expand = Callable[[DiscoverConfig], dict[str, dict[str, Any]]]  # the tasks a `discover` group finds in the data
MAX_CONFIG_BYTES = 256 * 1024  # several thousand lines; loads in well under a second
# a run's saved config lists every task with every setting (about 1 KiB a task): a mixture of thousands of
# discovered tasks is several MiB, which the run's own commands must still read
MAX_RUN_CONFIG_BYTES = 64 * 1024 * 1024


MAX_DEPTH = 64  # nesting levels, aliases expanded


MAX_VALUES = 100_000  # mappings, lists and scalars (keys aside), aliases expanded


if yaml.__with_libyaml__:  # libyaml's parser is about 8x faster; the composer stays Python's, for its depth check
    from yaml._yaml import CParser as _Parser

    class _LoaderBase(yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        def __init__(self, text: str) -> None:
            _Parser.__init__(self, text)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml
    _LoaderBase = yaml.SafeLoader  # type: ignore[misc,assignment]


class _Loader(_LoaderBase):
    """PyYAML's safe loader whose composer refuses nesting beyond MAX_DEPTH (its recursion would overflow)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                event: Any = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


# YAML 1.1 (PyYAML) reads `1e-3` as text: a float needs a dot there. YAML 1.2 and every user read it as a
# number; without this a method parameter `lr: 1e-3` reached its method as the text '1e-3'.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MERGE_TAG = "tag:yaml.org,2002:merge"


def parse_yaml(
    text: str, file: str | None, prefix: tuple[str, ...] = (), with_lines: bool = True
) -> tuple[Any, dict[tuple[str, ...], int]]:
    """One YAML document as (data, each key path's 1-based line). A key given twice in one mapping, an alias
    inside its own anchor, or a tree beyond MAX_DEPTH / MAX_VALUES once aliases are expanded is a ConfigError
    naming `file`, the line (with_lines) and the key path under `prefix`; a syntax error is a yaml.YAMLError."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        lines = _inspect(loader, root, file, prefix, with_lines)
        return _unshared(loader.construct_document(root)), lines
    finally:
        loader.dispose()


def _inspect(
    loader: _Loader, root: yaml.Node, file: str | None, prefix: tuple[str, ...], with_lines: bool
) -> dict[tuple[str, ...], int]:
    """Measure the tree the node graph stands for against the bounds, refuse duplicate keys, and map key paths
    to lines. A node met again through an alias adds its known size and height without a second walk (keys
    under that alias take the alias's line); each scalar is constructed here, cached for construct_document,
    so a bad one names its line."""
    lines: dict[tuple[str, ...], int] = {}
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values in its tree, levels below it)
    open_nodes: set[int] = set()  # collections on the current path: meeting one again is a cycle
    total = 0

    def fail(message: str, node: yaml.Node, path: tuple[str, ...]) -> ConfigError:
        line = node.start_mark.line + 1 if with_lines else None
        return ConfigError(message, file=file, line=line, field=".".join(path) or None)

    def scalar(node: yaml.Node, path: tuple[str, ...]) -> Any:
        try:
            return loader.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as error:
            problem = getattr(error, "problem", None) or str(error)
            raise fail(f"cannot read {node.value!r}: {problem}", node, path) from None

    def visit(node: yaml.Node, path: tuple[str, ...], depth: int) -> tuple[int, int]:
        nonlocal total
        known = measured.get(id(node))
        if known is None:
            if id(node) in open_nodes:
                raise fail("an alias refers to a value that contains it", node, path)
            total += 1
            known = measure(node, path, depth)
            measured[id(node)] = known
        else:
            total += known[0]
        if total > MAX_VALUES:
            raise fail(f"more than {MAX_VALUES} values once aliases are expanded", node, path)
        if depth + known[1] > MAX_DEPTH:
            raise fail(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", node, path)
        return known

    def measure(node: yaml.Node, path: tuple[str, ...], depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise fail(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", node, path)
        if isinstance(node, yaml.ScalarNode):
            scalar(node, path)
            return 1, 0
        open_nodes.add(id(node))
        size, height = 1, 0
        children: list[tuple[yaml.Node, tuple[str, ...], int, int | None]] = []  # node, path, depth, key line
        if isinstance(node, yaml.SequenceNode):
            children = [
                (item, (*path, str(i)), depth + 1, item.start_mark.line + 1) for i, item in enumerate(node.value)
            ]
        elif isinstance(node, yaml.MappingNode):
            # `<<: *defaults` first: its keys at this level, then the explicit ones, which win
            children = [(source, path, depth, None) for source in check_keys(node, path)]
            children += [
                (value, (*path, str(key.value)), depth + 1, key.start_mark.line + 1)
                for key, value in node.value
                if key.tag != MERGE_TAG
            ]
        for child, child_path, child_depth, line in children:
            if line is not None:
                lines[child_path] = line
            child_size, child_height = visit(child, child_path, child_depth)
            size += child_size
            height = max(height, child_height + child_depth - depth)
        open_nodes.discard(id(node))
        return size, height

    def check_keys(node: yaml.MappingNode, path: tuple[str, ...]) -> list[yaml.Node]:
        """Refuse a key given twice; return the mappings merged in (`<<`), the earliest last."""
        seen: dict[Any, int] = {}
        merged: list[yaml.Node] = []
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise fail("a key must be a plain value, not a list or mapping", key, (*path, "?"))
            name = str(key.value)
            if key.tag == MERGE_TAG:
                identity: Any = MERGE_TAG
                merged.extend(reversed(value.value) if isinstance(value, yaml.SequenceNode) else [value])
            else:  # equal as Python keys (1 and 0x1, true and True): the later one would replace the earlier
                identity = scalar(key, (*path, name))
            try:
                first = seen.get(identity)
                seen.setdefault(identity, key.start_mark.line + 1)
            except TypeError:  # unhashable: the constructor refuses it
                first = None
            if first is not None:
                where = f" (first on line {first})" if with_lines else ""
                raise fail(f"key '{name}' is given twice{where}", key, (*path, name))
        return merged

    visit(root, prefix, 0)
    return {key[len(prefix) :]: line for key, line in lines.items()}


def _unshared(value: Any) -> Any:
    """A copy in which no dict or list appears twice: an override of one alias's key must not change the others."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.steps=100` -> (["training", "steps"], 100); the value is read as YAML (text that is not YAML
    stays text), under the same bounds as a config file."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    try:
        value = parse_yaml(raw, "override", tuple(key.split(".")), with_lines=False)[0] if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(path[: i + 1])}' is not a group", field=".".join(path))
        node = child
    node[path[-1]] = value


def read_config_file(
    path: str | Path, limit: int = MAX_CONFIG_BYTES
) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML config file as (data, key lines); anything that is not a YAML mapping is a one-line ConfigError
    naming the file (and the line, where there is one); so is a file over `limit` bytes."""
    path = Path(path)
    file = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError("config file not found", file=file) from None
    except OSError as error:
        raise ConfigError(f"cannot read config: {error.strerror or error}", file=file) from None
    if len(raw) > limit:
        size = f"{limit // 1024} KiB" if limit < 1024 * 1024 else f"{limit // (1024 * 1024)} MiB"
        raise ConfigError(f"larger than {size}: not a config", file=file)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"cannot read config: not UTF-8 text (byte {error.start})", file=file) from None
    try:
        data, lines = parse_yaml(text, file)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or getattr(error, "reason", None) or "not YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of groups (run, model, training, tasks, ...)", file=file)
    return data, lines


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    check: Check | None = None,
    expand: Expand | None = None,
) -> Config:
    """The config file at `path` with `overrides` ("key.path=value") applied, validated against the schema and
    then by `check` (the method registries' checks live above this package: catalogue.load_config passes
    them); a `discover` group is expanded into tasks by `expand` (which reads the data: data/discovery.py).
    Raises ConfigError naming the file, line and field."""
    path = Path(path)
    data, lines = read_config_file(path)
    overridden: dict[tuple[str, ...], str] = {}  # key path -> its value's repr
    for text_override in overrides:
        key_path, value = parse_override(text_override)
        key = tuple(key_path)
        if overridden.get(key) == repr(value):  # the same value again: nothing is lost
            continue
        for earlier in overridden:  # a later override would silently undo an earlier one
            if earlier[: len(key)] == key:
                dotted, first = ".".join(key), ".".join(earlier)
                raise ConfigError(
                    f"'{dotted}' is overridden twice, with different values"
                    if earlier == key
                    else f"'{dotted}' replaces the earlier override of '{first}': give the group first, then its keys",
                    file="override",
                    field=dotted,
                )
        apply_override(data, key_path, value)
        overridden[key] = repr(value)
    config = validate_discovering(data, path.parent, str(path), lines, set(overridden), check, expand)
    resolve_paths(config, path.parent)
    return config


def validate_discovering(
    data: dict[str, Any],
    base: Path,
    file: str | None = None,
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: set[tuple[str, ...]] = frozenset(),  # type: ignore[assignment]
    check: Check | None = None,
    expand: Expand | None = None,
) -> Config:
    """`validate_config`, with a `discover` group expanded by `expand` (its paths relative to `base`): the
    config is validated without the tasks' own keys first, discovery finds the tasks, then the whole config
    is validated and checked. The one path of a config file and of a config given as a mapping."""
    lines = lines if lines is not None else {}
    discovering = data.get("discover") is not None and expand is not None  # the checks wait for the tasks
    config = validate_config(
        without_task_keys(data) if discovering else data,
        file=file,
        lines=lines,
        overridden=overridden,
        check=None if discovering else check,
    )
    if config.discover is not None and expand is not None:
        data, lines = with_discovered(data, lines, config, base, expand, file, overridden)
        config = validate_config(data, file=file, lines=lines, overridden=overridden, check=check)
    return config


def without_task_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the `tasks` entries that hold no source: before discovery they may be a discovered
    task's own keys (`tasks.NAME.KEY=VALUE` overrides), checked once discovery has found the task."""
    tasks = data.get("tasks")
    if not isinstance(tasks, dict):
        return data
    kept = {name: entry for name, entry in tasks.items() if not (isinstance(entry, dict) and "source" not in entry)}
    return {**data, "tasks": kept}


def with_discovered(
    data: dict[str, Any],
    lines: dict[tuple[str, ...], int],
    config: Config,
    base: Path,
    expand: Expand,
    file: str | None,
    overridden: set[tuple[str, ...]] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """`data` with the `discover` group replaced by the tasks it finds (paths resolved against `base`). A key
    of `defaults` or `overrides` that no task takes is an error at its own line; an error in a discovered task
    is located at the `discover` group. A `tasks` entry without a source for a discovered task (as an
    override `tasks.NAME.KEY=VALUE` makes) is that task's own keys; a full entry for one is a ConfigError."""
    discover = config.discover
    assert discover is not None
    keys = set(TaskConfig.model_fields)
    given: list[tuple[tuple[str, ...], str]] = [(("discover", "defaults", k), k) for k in discover.defaults]
    given += [(("discover", "overrides", n, k), k) for n, own in discover.overrides.items() for k in own]
    for path, key in given:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            source, line = _locate(path, file, lines, overridden)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown task key{hint}", file=source, line=line, field=".".join(path))
    resolve_source(discover.source, base)
    try:
        found = expand(discover)
    except ConfigError as error:
        if error.file is None:
            error.file, error.line = _locate(tuple((error.field or "discover").split(".")), file, lines, overridden)
        raise
    named = dict(data.get("tasks") or {})
    for name in sorted(set(named) & set(found)):
        own = named[name]
        if isinstance(own, dict) and "source" not in own:  # a task's own keys, e.g. from an override
            found[name] = {**found[name], **own}
            del named[name]
            continue
        raise ConfigError(
            f"task '{name}' is named in tasks and found by discover: give its own keys in discover.overrides",
            file=file,
            line=lines.get(("tasks", name)),
            field=f"tasks.{name}",
        )
    expanded = {key: value for key, value in data.items() if key != "discover"}
    expanded["tasks"] = {**named, **found}
    at = lines.get(("discover",))
    located = dict(lines)
    if at is not None:
        located.update({("tasks", name): at for name in found})
    return expanded, located


def load_run_config(path: str | Path, run_settings: dict[str, Any] | None = None, check: Check | None = None) -> Config:
    """A run directory's saved config.yaml (resume, evaluate, predict, serve, export), with `run_settings`
    replacing keys of its run group; a file that is not a multitune config is a one-line ConfigError."""
    data, lines = read_config_file(path, MAX_RUN_CONFIG_BYTES)
    if run_settings:
        group = data.setdefault("run", {})
        if not isinstance(group, dict):
            raise ConfigError("must be a group", file=str(path), line=lines.get(("run",)), field="run")
        group.update(run_settings)
    return validate_config(data, file=str(path), lines=lines, check=check)


def validate_config(
    data: dict[str, Any],
    file: str | None = None,
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: set[tuple[str, ...]] = frozenset(),  # type: ignore[assignment]
    check: Check | None = None,
) -> Config:
    """`data` as a Config; a ConfigError (from the schema, the number check or `check`) is located at the
    file and line its key came from, or at the override that set it."""
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc = tuple(str(part) for part in first["loc"] if not str(part).startswith("function-"))
        loc = tuple(p for p in loc if p not in ("str", "int", "list[union[str,int]]"))
        key = ".".join(loc)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a group; a dataclass group
            close = difflib.get_close_matches(loc[-1], known_keys(loc[:-1]), n=1) if loc else []
            message = f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"
        elif first["type"] == "missing":
            message = "required key is missing"
        else:
            message = (
                f"{message} (got {first.get('input')!r})"
                if "input" in first and first["type"] != "value_error"
                else message
            )
            if first["type"] == "literal_error" and isinstance(first.get("input"), str):  # a misspelt choice
                choices = re.findall(r"'([^']*)'", str(first.get("ctx", {}).get("expected", "")))
                close = difflib.get_close_matches(first["input"], choices, n=1)
                message += f"; did you mean '{close[0]}'?" if close else ""
        source, line = _locate(loc, file, lines or {}, overridden)
        raise ConfigError(message, file=source, line=line, field=key or None) from None
    try:
        check_numbers(config.model_dump(), "")
        if check is not None:
            check(config)
    except ConfigError as error:
        if error.file is None and error.field:
            error.file, error.line = _locate(tuple(error.field.split(".")), file, lines or {}, overridden)
        raise
    return config


def _locate(
    key: tuple[str, ...], file: str | None, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]]
) -> tuple[str | None, int | None]:
    """Where a key's value came from: (the config file, the line of its nearest written key) or ("override", None)
    when an override set the key, or wrote the part of its path below the file's nearest written key (a task or
    a key the file never had: `tasks.new.type=...`, `tasks.trec.max_rowz.train=3`)."""
    if any(key[: len(o)] == o for o in overridden):
        return "override", None
    written = next((n for n in range(len(key), 0, -1) if key[:n] in lines), 0)
    if written < len(key) and any(o[: written + 1] == key[: written + 1] for o in overridden):
        return "override", None
    return (file, lines[key[:written]]) if written else (file, None)


def package_path(relative: str) -> Path:
    return Path(str(resources.files("multitune") / "assets")) / relative


def resolve_path(value: str, base: Path) -> str:
    if value.startswith(PACKAGE_PREFIX):
        return str(package_path(value[len(PACKAGE_PREFIX) :]))
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_source(source: SourceConfig, base: Path) -> None:
    """A source's split files and data_files made absolute (relative ones are relative to `base`)."""
    for split in SPLITS:
        value = getattr(source, split)
        if isinstance(value, list):
            setattr(source, split, [resolve_path(v, base) for v in value])
        elif value:
            setattr(source, split, resolve_path(value, base))
    if source.data_files:
        source.data_files = {
            split: [resolve_path(v, base) for v in files] if isinstance(files, list) else resolve_path(files, base)
            for split, files in source.data_files.items()
        }


def resolve_paths(config: Config, base: Path) -> None:
    """Make data paths absolute so a saved config runs from anywhere."""
    for task in config.tasks.values():
        resolve_source(task.source, base)
    if config.guard.baselines_from:
        config.guard.baselines_from = resolve_path(config.guard.baselines_from, base)
    if config.model.init_from:
        config.model.init_from = resolve_path(config.model.init_from, base)
    backbone = config.model.backbone
    # a path, or a bare name that is a folder beside the config (as data paths are), not one beside wherever
    # the command runs; other names are hub ids
    if backbone.startswith((".", "/", "~", PACKAGE_PREFIX)) or (base / backbone).is_dir():
        config.model.backbone = resolve_path(backbone, base)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
