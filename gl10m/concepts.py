"""Concept tag rules: small pure predicates over OSM tag dicts, compiled from profile data.

Grammar (one rule is a YAML mapping):
  {key: value}          tag `key` equals `value`
  {key: [v1, v2]}       tag `key` is one of the values
  {key: "*"}            tag `key` is present and not "no"
  {key: {token: t}}     tag value split on ; , | or whitespace contains token t
  {"pre*": "*"}         some key starting with "pre" is present (and not "no")
  several keys in one mapping: all of them must hold
  {any: [r, ...]}  {all: [r, ...]}  {not: r}
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

Tags = Mapping[str, str]
Predicate = Callable[[Tags], bool]

_TOKEN_SPLIT = re.compile(r"[;,|\s]+")


class RuleError(ValueError):
    """A rule that does not follow the grammar."""


def sport_tokens(value: str) -> set[str]:
    """Split a multi-valued tag (``soccer;american_football``) into its tokens."""
    return {t for t in _TOKEN_SPLIT.split(value.strip().lower()) if t}


def _present(v: str | None) -> bool:
    return v is not None and v != "no"


def _leaf(key: str, spec: Any) -> Predicate:
    if key.endswith("*"):
        prefix = key[:-1]
        if spec != "*" or not prefix:
            raise RuleError(f"prefix key {key!r} only takes \"*\"")
        return lambda tags: any(k.startswith(prefix) and _present(v) for k, v in tags.items())
    if spec == "*":
        return lambda tags: _present(tags.get(key))
    if isinstance(spec, bool) or spec is None:
        raise RuleError(f"tag {key!r}: value must be a string, a list, \"*\" or {{token: ...}}")
    if isinstance(spec, (str, int, float)):
        want = str(spec)
        return lambda tags: tags.get(key) == want
    if isinstance(spec, list):
        if not spec or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in spec):
            raise RuleError(f"tag {key!r}: a value list must be non-empty strings")
        wanted = frozenset(str(v) for v in spec)
        return lambda tags: tags.get(key) in wanted
    if isinstance(spec, dict) and set(spec) == {"token"} and isinstance(spec["token"], str):
        tok = spec["token"].lower()
        return lambda tags: key in tags and tok in sport_tokens(tags[key])
    raise RuleError(f"tag {key!r}: unknown value form {spec!r}")


def compile_rule(rule: Any) -> Predicate:
    """Compile a rule (see module doc) into a predicate; raise RuleError on a malformed rule."""
    if not isinstance(rule, dict) or not rule:
        raise RuleError(f"a rule must be a non-empty mapping, got {rule!r}")
    preds: list[Predicate] = []
    for key, spec in rule.items():
        if key in ("any", "all"):
            if not isinstance(spec, list) or not spec:
                raise RuleError(f"{key!r} takes a non-empty list of rules")
            subs = [compile_rule(r) for r in spec]
            preds.append((lambda s: lambda t: any(p(t) for p in s))(subs) if key == "any"
                         else (lambda s: lambda t: all(p(t) for p in s))(subs))
        elif key == "not":
            sub = compile_rule(spec)
            preds.append(lambda t, sub=sub: not sub(t))
        elif not isinstance(key, str) or not key:
            raise RuleError(f"bad tag key {key!r}")
        else:
            preds.append(_leaf(key, spec))
    if len(preds) == 1:
        return preds[0]
    return lambda tags: all(p(tags) for p in preds)


def rule_keys(rule: Any) -> set[str]:
    """Every tag key a rule reads (prefix keys keep their '*'); used to pre-filter OSM objects."""
    keys: set[str] = set()
    if isinstance(rule, dict):
        for key, spec in rule.items():
            if key in ("any", "all"):
                for r in spec:
                    keys |= rule_keys(r)
            elif key == "not":
                pass  # a negation alone never makes an object match
            else:
                keys.add(key)
    return keys


class ConceptMatcher:
    """Match a tag dict against all concepts of a profile, in class-index order."""

    def __init__(self, concepts):
        self.concepts = list(concepts)
        self._preds = [(c.id, compile_rule(c.rule)) for c in self.concepts]
        keys: set[str] = set()
        for c in self.concepts:
            keys |= rule_keys(c.rule)
        self.exact_keys = frozenset(k for k in keys if not k.endswith("*"))
        self.prefixes = tuple(sorted(k[:-1] for k in keys if k.endswith("*")))
        self._memo: dict[frozenset, tuple[int, ...]] = {}

    def could_match(self, keys) -> bool:
        """Cheap pre-filter: does the object carry any key some rule reads?"""
        for k in keys:
            if k in self.exact_keys or (self.prefixes and k.startswith(self.prefixes)):
                return True
        return False

    def match(self, tags: Tags) -> list[int]:
        """Concept ids whose rule holds for these tags (sorted). Memoised by the tag set: the rules
        are pure functions of the tags, and generated worlds repeat the same few tag sets."""
        try:
            key = frozenset(tags.items())
        except TypeError:  # an unhashable value: match without the memo
            return [cid for cid, pred in self._preds if pred(tags)]
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= 8192:
                self._memo.clear()
            hit = self._memo[key] = tuple(cid for cid, pred in self._preds if pred(tags))
        return list(hit)
