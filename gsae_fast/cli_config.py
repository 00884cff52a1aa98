"""Option files and sweeps for ``gsae-fast train`` (``--config FILE``, ``--sweep
KEY=V1,V2,...|FILE``): reading a JSON / YAML file and checking each value as the command's
flag would (its type, its choices), with one-line errors naming the file and the key.
gsae_fast.cli uses it.
"""
from __future__ import annotations

import argparse
import difflib
import itertools
import json


class ConfigError(ValueError):
    """A --config file that cannot be used: the message names the file (and the key)."""


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _read_config(path: str) -> dict:
    """The mapping in a JSON file (YAML for .yaml/.yml, when PyYAML is installed)."""
    values = _read_config_any(path)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got "
                          f"{type(values).__name__}")
    return values


def _read_config_any(path: str):
    """The value in a JSON file (YAML for .yaml/.yml, when PyYAML is installed)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from None
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML needs PyYAML, which is not installed (pip install "
                              f"pyyaml); or give the options as JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return values


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string"}


def _config_value(path: str, key: str, value, action: argparse.Action, yaml: bool = False):
    """``value`` checked against the option ``action`` parses, in the type it gives. In YAML a
    number such as 1e-4 reads as a string (YAML 1.1 wants 1.0e-4): taken as the number."""
    def refuse(expected):
        got = json.dumps(value, default=str)
        raise ConfigError(f"{path}: {key!r} must be {expected}, got {got}")

    def scalar(v, typ):
        if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if typ is float and yaml and isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return None
        if isinstance(v, typ) and not isinstance(v, bool):
            return v
        return None

    if value is None and action.default is None:  # an option that may be left unset
        return None
    if action.nargs == 0:  # --flag / --no-flag, store_true
        if not isinstance(value, bool):
            refuse("true or false")
        return value
    typ = action.type or str
    name = _TYPE_NAMES.get(typ, typ.__name__)
    if isinstance(action.nargs, int):  # a fixed number of values
        items = [scalar(v, typ) for v in value] if isinstance(value, (list, tuple)) else None
        if items is None or len(items) != action.nargs or None in items:
            refuse(f"a list of {action.nargs} values, each {name}")
        return items
    if action.nargs in ("+", "*"):  # a list (one value may be given alone)
        items = [scalar(v, typ) for v in (value if isinstance(value, list) else [value])]
        if None in items or (action.nargs == "+" and not items):
            refuse(f"{name} or a list of them")
        return items
    v = scalar(value, typ)
    if v is None:
        refuse(name)
    if action.choices is not None and v not in action.choices:
        refuse("one of " + ", ".join(map(str, action.choices)))
    return v


def config_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """The options of the --config file ``path``, checked against ``parser``'s (by dest
    name), in the types its flags give: one ConfigError naming the file and the first bad
    key."""
    actions = {a.dest: a for a in parser._actions
               if a.dest not in ("help", "config") and a.dest is not argparse.SUPPRESS}
    out = {}
    for key, value in _read_config(path).items():
        if key not in actions:
            close = difflib.get_close_matches(str(key).replace("-", "_"), actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        out[key] = _config_value(path, key, value, actions[key],
                                 yaml=path.lower().endswith((".yaml", ".yml")))
    return out


def sweep_values(items, parser: argparse.ArgumentParser, config_keys: set) -> list:
    """The members of --sweep: each ``KEY=V1,V2,...`` a list of values of a train option (the
    members are every combination), or a JSON / YAML file listing the members' settings
    (``[{"l1_coefficient": 1}, {"arch": "topk", "k": 32}]`` or ``{"members": [...]}``). Each
    value is checked as the option's flag would check it."""
    from .sweep import member_name
    actions = {a.dest: a for a in parser._actions}
    grid, listed = {}, []
    for item in items:
        if "=" not in item:  # a file of members
            values = _read_config_any(item)
            if isinstance(values, dict) and set(values) == {"members"}:
                values = values["members"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{item}: expected a list of members (mappings of train "
                                  f"options), or {{\"members\": [...]}}")
            for i, member in enumerate(values):
                if not isinstance(member, dict):
                    raise ConfigError(f"{item}: member {i} must be a mapping of train options")
                checked = {}
                for key, value in member.items():
                    if key == "name":
                        checked[key] = str(value)
                        continue
                    if key not in config_keys:
                        raise ConfigError(f"{item}: member {i}: {key!r} is not a setting of an "
                                          f"SAE (a TrainConfig field) that a sweep can vary")
                    v = _config_value(item, f"member {i}: {key}", value, actions[key],
                                      yaml=item.lower().endswith((".yaml", ".yml")))
                    checked[key] = tuple(v) if isinstance(v, list) else v
                listed.append(checked)
            continue
        key, _, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in config_keys:
            close = difflib.get_close_matches(key, config_keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--sweep {item}: {key!r} is not a train option an SAE can vary"
                              f"{hint}")
        action = actions[key]
        parsed = []
        for raw in text.split(","):
            try:
                parsed.append(action.type(raw) if action.type else raw)
            except ValueError:
                want = _TYPE_NAMES.get(action.type, getattr(action.type, "__name__", "?"))
                raise ConfigError(f"--sweep {item}: {raw!r} is not {want}") from None
            if action.choices is not None and parsed[-1] not in action.choices:
                raise ConfigError(f"--sweep {item}: {raw!r} is not one of "
                                  f"{', '.join(map(str, action.choices))}")
        grid[key] = parsed
    if listed and grid:  # every listed member with every combination
        combos = []
        for m in listed:
            for vals in itertools.product(*grid.values()):
                combo = dict(zip(grid, vals))
                combos.append(dict(m, **combo))
                if "name" in m:
                    combos[-1]["name"] = f"{m['name']}_{member_name(combo)}"
    elif grid:
        combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    else:
        combos = listed
    return combos
