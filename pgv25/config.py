"""Find, load and override MMEngine-style config files, with one-line errors for every user mistake."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .errors import UserError


PACKAGED_CONFIGS = Path(__file__).resolve().parent / ".mim" / "configs"  # the wheel's copy of configs/ (setup.py)
CHECKOUT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # a source checkout or an editable install
# What users give where a config goes by mistake: data (the message then says where a dataset path goes) or weights.
DATA_SUFFIXES = {".parquet", ".arrow", ".csv", ".tsv", ".jsonl", ".json", ".txt", ".tar", ".zip", ".jpg", ".jpeg", ".png",
                 ".webp", ".bmp", ".gif", ".tif", ".tiff"}
WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".bin", ".pt"}


def config_roots() -> list[Path]:
    """Where config names are looked up: $PGV25_CONFIG_DIR, ./configs, the checkout's configs/, the installed copy."""
    roots = []
    if os.environ.get("PGV25_CONFIG_DIR"):
        roots.append(Path(os.environ["PGV25_CONFIG_DIR"]))
    roots += [Path.cwd() / "configs", CHECKOUT_CONFIGS, PACKAGED_CONFIGS]
    unique = []
    for root in roots:
        if root.is_dir() and root.resolve() not in [u.resolve() for u in unique]:
            unique.append(root)
    return unique


def list_configs(pattern: str | None = None) -> dict[str, Path]:
    """Leaf config names (files outside `_base_`) → path; the first root wins on a clash."""
    found: dict[str, Path] = {}
    for root in config_roots():
        for path in sorted(root.rglob("*.py")):
            if "_base_" in path.relative_to(root).parts:
                continue
            if pattern is None or pattern.lower() in path.stem.lower():
                found.setdefault(path.stem, path)
    return found


def find_config(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix or os.sep in name_or_path:
        if path.is_file() and path.suffix == ".py":
            return path
        raise UserError(not_a_config(name_or_path, path))
    configs = list_configs()
    if name_or_path in configs:  # a name wins over a same-named folder here (e.g. a --work-dir)
        return configs[name_or_path]
    if path.exists():
        raise UserError(not_a_config(name_or_path, path))
    close = difflib.get_close_matches(name_or_path, configs, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `pgv25 list-cfg` shows them all"
    raise UserError(f"no config named '{name_or_path}'{hint}")


def not_a_config(given: str, path: Path) -> str:
    """The one line for a path that is not a config file; for data, where a dataset path goes instead."""
    if not path.exists():
        return f"config file {given} does not exist"
    suffix = path.suffix.lower()
    data = path.is_dir() or suffix in DATA_SUFFIXES
    what = "a folder" if path.is_dir() else "a data file" if data else "a weights file" if suffix in WEIGHT_SUFFIXES else "not a .py file"
    message = f"{given} is {what}, not a config: a config is a .py file or a name from `pgv25 list-cfg`"
    if data:
        message += (f"; to train on this data, give a config and point its dataset here: pgv25 train CONFIG "
                    f"--cfg-options train_dataloader.dataset.path={given} (and dataset.type=folder|manifest|hub, see README 'Data')")
    return message


def load_config(name_or_path: str, cfg_options: dict | None = None):
    """mmengine `Config` with `_base_` inheritance, then validated `--cfg-options` merged in."""
    from mmengine.config import Config

    path = find_config(name_or_path)
    try:
        cfg = Config.fromfile(str(path))
    except SyntaxError as error:
        located = locate_syntax_error(path) or error  # mmengine parses without a file name
        raise UserError(f"{located.filename or path}:{located.lineno}: syntax error: {located.msg}") from None
    except (FileNotFoundError, KeyError, NameError, TypeError, ValueError, ImportError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read config {path}: {detail}") from None
    cfg.config_name = path.stem
    if cfg_options:
        check_option_keys(cfg, cfg_options)
        cfg.merge_from_dict(cfg_options)
    return cfg


def locate_syntax_error(path: Path, seen: set | None = None) -> SyntaxError | None:
    """Compile `path`, then the `_base_` files it names, and return the first SyntaxError with its file."""
    import ast

    seen = seen if seen is not None else set()
    if path in seen or not path.is_file():
        return None
    seen.add(path)
    source = path.read_text()
    try:
        tree = compile(source, str(path), "exec", ast.PyCF_ONLY_AST)
    except SyntaxError as error:
        return error
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_base_" for t in node.targets):
            try:
                bases = ast.literal_eval(node.value)
            except ValueError:
                return None
            for base in [bases] if isinstance(bases, str) else bases:
                found = locate_syntax_error((path.parent / base).resolve(), seen)
                if found:
                    return found
    return None


def flat_keys(tree, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, dict):
            keys += flat_keys(value, full + ".")
    return keys


def check_option_keys(cfg, options: dict) -> None:
    """Refuse an override of a key the config does not have: a typo must not silently add a new key."""
    tree = cfg.to_dict()
    known = flat_keys(tree)
    for key in options:
        if key not in known and not _under_open_mapping(tree, key):
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--cfg-options: the config has no key '{key}'{hint}")


def _under_open_mapping(tree: dict, key: str) -> bool:
    """A key below one whose value is an empty dict (`filters=dict()`): a mapping the user fills, not a typo."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        node = tree
        for part in parts[:depth]:
            node = node.get(part) if isinstance(node, dict) else None
        if node == {}:
            return True
    return False


def parse_cfg_options(pairs: list[str]) -> dict:
    """`k=v` strings → dict; values parsed like MMEngine's DictAction (numbers, bools, None, lists)."""
    from mmengine.config import DictAction

    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--cfg-options expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        options[key] = DictAction._parse_iterable(value)
    return options
