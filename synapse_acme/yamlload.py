"""Reading a YAML config file with bounds, so a hostile or broken file cannot take the process.

PyYAML's safe loader builds only plain types, but it still expands what the file asks for:
aliases make a "billion laughs" document (a few hundred bytes whose aliases nest into 10^9
references: fine to load, fatal to walk, print or copy), and 100,000 nested ``[`` blow the
interpreter's recursion limit. A homeserver.yaml is a few KiB of hand-written mappings, so:

- the file is at most :data:`MAX_BYTES`;
- nesting is at most :data:`MAX_DEPTH` levels;
- at most :data:`MAX_ALIASES` aliases (``*name``) are followed, and an alias may not point at a
  collection that itself holds aliases (the building block of every alias bomb), while plain
  reuse (``<<: *defaults``, one anchor used a few times) keeps working.

Every violation is a :class:`YamlBoundsError` with the line, which the config reader turns into
a ConfigError naming the file.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_BYTES = 4 * 1024 * 1024  # a large homeserver.yaml is ~100 KiB
MAX_DEPTH = 64
MAX_ALIASES = 1000


class YamlBoundsError(ValueError):
    """The document is over one of the bounds; the message says which and where."""


class _BoundedLoader(yaml.SafeLoader):
    """The pure-Python safe loader with depth and alias bounds (the composer is where nodes and
    aliases are resolved; the C loader cannot be hooked there)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlBoundsError(
                    f"more than {MAX_ALIASES} aliases (*name), line {event.start_mark.line + 1}"
                )
            node = super().compose_node(parent, index)
            if node is not None and _holds_alias_targets(node):
                raise YamlBoundsError(
                    "an alias to a collection that itself uses aliases (an alias bomb?), "
                    f"line {event.start_mark.line + 1}"
                )
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlBoundsError(
                    f"nested deeper than {MAX_DEPTH} levels, line {mark.line + 1}"
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        return node


def _holds_alias_targets(node: Node) -> bool:
    """True if ``node`` contains a collection that appears more than once below it (what
    an alias inside an aliased collection looks like after composition)."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, (SequenceNode, MappingNode)):
            if id(current) in seen:
                return True
            seen.add(id(current))
            if isinstance(current, SequenceNode):
                stack.extend(current.value)
            else:
                for k, v in current.value:
                    stack.extend((k, v))
    return False


def safe_load_bounded(text: str) -> Any:
    """``yaml.safe_load`` with the bounds above. YamlBoundsError or yaml.YAMLError."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YamlBoundsError(f"the file is larger than {MAX_BYTES // (1024 * 1024)} MiB")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_cycles(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_cycles(root: Node) -> None:
    """YamlBoundsError if a collection contains itself (``&a [*a]``): walking it would never end."""
    on_path: set[int] = set()
    done: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            done.add(id(node))
            continue
        if not isinstance(node, (SequenceNode, MappingNode)) or id(node) in done:
            continue
        if id(node) in on_path:
            raise YamlBoundsError(
                f"a collection that contains itself, line {node.start_mark.line + 1}"
            )
        on_path.add(id(node))
        stack.append((node, True))
        children = (
            node.value
            if isinstance(node, SequenceNode)
            else [n for pair in node.value for n in pair]
        )
        stack.extend((child, False) for child in children)
