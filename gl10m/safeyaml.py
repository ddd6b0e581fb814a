"""The YAML loader for every YAML a user hands gl10m (profiles, testbed specs, model configs).

``yaml.safe_load`` constructs no Python objects, but it still expands aliases (a 17 kB
"billion laughs" profile ran 89 s of CPU and ended in MemoryError) and lets a later duplicate key
silently replace an earlier one (two ``qc:`` sections: the first one is ignored). :func:`load`
refuses both, and a nesting deeper than :data:`MAX_DEPTH`, with a :class:`StrictYAMLError` (a
``yaml.YAMLError``, so callers' existing handlers apply) whose message is one line naming the line.
"""
from __future__ import annotations

import yaml

MAX_DEPTH = 200  # far above any profile or config; stops recursion-depth bombs ([[[[...]]]])


class StrictYAMLError(yaml.MarkedYAMLError):
    """A YAML construct gl10m refuses (an anchor, an alias, a duplicate key), with its position."""

    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)

    def __str__(self) -> str:
        m = self.problem_mark
        return f"line {m.line + 1}, column {m.column + 1}: {self.problem}" if m else str(self.problem)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases and without duplicate mapping keys."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise StrictYAMLError(f"YAML aliases (*{event.anchor}) are not allowed: write the value out", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise StrictYAMLError(f"YAML anchors (&{event.anchor}) are not allowed: write the values out",
                                  event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise StrictYAMLError(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise StrictYAMLError(f"duplicate key {key!r} (first on line {first + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load(text: str | bytes):
    """Parse one YAML document like ``yaml.safe_load``, refusing anchors, aliases, duplicate keys
    and deep nesting (:class:`StrictYAMLError`, a ``yaml.YAMLError``)."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_mapping(path, what: str = "config", error: type[Exception] | None = None) -> dict:
    """A YAML file that must hold a mapping, parsed with :func:`load`; every failure (unreadable,
    not valid YAML, not a mapping) is one line naming ``what`` and the file, raised as ``error``
    (default :class:`gl10m.errors.UserError`)."""
    from pathlib import Path

    if error is None:
        from gl10m.errors import UserError as error
    p = Path(path)
    try:
        data = load(p.read_text())
    except FileNotFoundError:
        raise error(f"{what} {p}: not found") from None
    except OSError as e:
        raise error(f"{what} {p}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{what} {p}: expected a mapping")
    return data
