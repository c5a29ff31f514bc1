"""Check a command line before Hydra runs it: an unknown option, key or group choice, or a run directory that is
a file, ends in one line ("did you mean ...") and exit 2 instead of Hydra's multi-line error and exit 1.

    if __name__ == "__main__":
        preflight("config")     # train.py; evaluate.py passes "evaluate"
        main()

Only what can be decided for certain is reported; anything else is left to Hydra, so a check here can never
stop a command that Hydra would run.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sae.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # sae/run/ -> the repository
EXIT_BAD_INPUT = 2


class CommandLineError(UserError, ValueError):
    """An override that names no option, key or config-group choice of this project."""


def _suggest(word: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, sorted(set(choices)), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def _group_options(group: str) -> list[str] | None:
    """The choices of config group `group` (its yaml files, or the generated ones of sae/run/configs.py), or None
    if it is not one of this project's groups. Called inside an initialized Hydra."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    if not loader.repository.group_exists(group):
        return None
    return sorted(loader.get_group_options(group))


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            keys += _dotted_keys(node._get_node(key), path + ".") if isinstance(node._get_node(key), DictConfig) else []
    return keys


def check_overrides(config_name: str, overrides: list[str]) -> DictConfig | None:
    """Raise CommandLineError for the first override that names no group choice or config key; return the
    composed config (with Hydra's own node) when it composes, else None (left to Hydra)."""
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise CommandLineError(f"cannot parse the command line: {str(e).splitlines()[0]}") from None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _check_parsed(config_name, parsed)


def _check_parsed(config_name: str, parsed: list) -> DictConfig | None:
    from hydra import compose

    group_overrides, key_overrides = [], []
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra/"):  # Hydra's own groups (hydra/launcher=basic): Hydra knows their choices
            group_overrides.append(override)
            continue
        options = _group_options(key)  # optim@sae=adam is the optim group too
        if options is None or override.is_delete():
            key_overrides.append(override)
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            for choice in value if isinstance(value, list) else [value]:
                if choice is not None and str(choice) not in options and str(choice) != "null":
                    shown = f" Choices: {', '.join(options)}."
                    raise CommandLineError(f"{key}={choice} is not an option of the {key!r} config group."
                                           f"{_suggest(str(choice), options, key + '=')}{shown}")
        group_overrides.append(override)

    def first(override) -> str:
        text = override.input_line
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()))
            text = f"{override.get_key_element()}={value}"
        return text

    try:
        base = compose(config_name, overrides=[first(o) for o in group_overrides], return_hydra_config=True)
    except Exception:  # noqa: BLE001 - anything else is Hydra's to report
        return None
    known = _dotted_keys(base)
    for override in key_overrides:
        key = override.key_or_group
        adding = override.input_line.lstrip().startswith("+")
        if adding or _has_key(base, key):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        if parent and not isinstance(node, DictConfig):
            continue  # a key inside a value (a list, a plain value): Hydra's to report
        siblings = [f"{parent}.{k}" if parent else str(k) for k in node.keys()]
        hint = _suggest(key, siblings) or _suggest(key, known)
        raise CommandLineError(f"{key} is not an option of this config.{hint} (A new key needs a leading +: "
                               f"+{override.input_line.lstrip('~')}.)")
    try:
        return compose(config_name, overrides=[first(o) for o in parsed], return_hydra_config=True)
    except Exception:  # noqa: BLE001
        return None


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    """Whether `dotted` names a key of `cfg` (or lies inside a list or a value, which Hydra checks itself)."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig):
            return True
        if part not in node.keys():
            return False
        node = node._get_node(part)
        if node is not None and node._is_interpolation():
            return True  # e.g. data.extractor: ${model}; Hydra resolves and checks what is behind it
    return True


def check_run_dir(cfg: DictConfig, multirun: bool) -> None:
    """The run (or sweep) directory, or one of its parents, must not be a file."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        directory = Path(str(OmegaConf.select(cfg, key)))
    except Exception:  # noqa: BLE001 - an interpolation only Hydra can resolve
        return
    for path in (directory, *directory.parents):
        if path.is_file():
            raise CommandLineError(f"{key}={directory} cannot be a run directory: {path} is a file. Choose a "
                                   f"folder with {key}=DIR.")


def preflight(config_name: str, argv: list[str] | None = None) -> None:
    """Check the command line (see the module doc); on a certain error print one line and exit 2."""
    from hydra._internal.utils import get_args_parser  # private: Hydra exposes no parser of its own flags

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return  # argparse's own message; Hydra will repeat it
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir or args.config_path \
            or args.config_name or args.experimental_rerun:
        return
    try:
        cfg = check_overrides(config_name, args.overrides)
        if cfg is not None:
            check_run_dir(cfg, args.multirun)
    except CommandLineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except Exception:  # noqa: BLE001 - never stop a command because of this check itself
        return
