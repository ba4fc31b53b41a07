"""Text and heading sections out of HTML (Beautiful Soup's html.parser).

Scripts, styles and other non-text elements are skipped; block elements and
``<br>`` break lines, table cells of a row stay on one line, ``<pre>`` keeps
its whitespace. Each heading becomes a section anchor at the offset where its
text starts.
"""

from __future__ import annotations

import re

from app.ingest.extract import ExtractionError, Section, _refuse_control_heavy, _sections_from_anchors

# Elements whose content is never text for a reader.
_HTML_SKIP = frozenset(
    {"script", "style", "noscript", "template", "svg", "math", "iframe", "object", "embed", "canvas"}
)
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_HTML_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "dialog", "div",
        "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hgroup", "hr", "html",
        "legend", "li", "main", "menu", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody",
        "tfoot", "thead", "title", "tr", "ul",
    }
)  # fmt: skip


MAX_HEADING_CHARS = 300  # of a heading's text kept as its section's title


class _Heading:
    __slots__ = ("offset", "order", "part")

    def __init__(self, order: int):
        self.order = order
        self.offset: int | None = None  # where its first character landed
        self.part = 0  # index of that part


class _TextBuilder:
    """Accumulates HTML text, with separators decided lazily.

    Whitespace and block breaks are only *requested*; the strongest pending
    separator is emitted just before the next real text. That way the text
    never starts or ends with separators and no cleanup pass afterwards
    shifts the offsets recorded for headings.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.pending = ""  # "", " " or "\n"
        self._anchors: list[tuple[int, int, str]] = []  # (offset, heading opened as n-th, title)
        self._awaiting: list[_Heading] = []  # opened headings whose first character is still to come
        self._opened = 0

    @property
    def anchors(self) -> list[tuple[int, str]]:
        # By offset; at one offset the heading opened last (the innermost) comes last and wins.
        return [(offset, title) for offset, _, title in sorted(self._anchors)]

    def separate(self, sep: str) -> None:
        if sep == "\n" or not self.pending:
            self.pending = sep

    def open_heading(self) -> _Heading:
        self._opened += 1
        heading = _Heading(self._opened)
        self._awaiting.append(heading)
        return heading

    def close_heading(self, heading: _Heading) -> None:
        """Anchor ``heading`` where its first character landed, titled with
        the first MAX_HEADING_CHARS of the text written since: each heading
        reads a bounded part of the text, so nested headings stay linear
        (reading each heading's whole subtree was quadratic: 24 KB of nested
        <h1> took 10 s)."""
        if heading.offset is None:  # no text in it
            if heading in self._awaiting:
                self._awaiting.remove(heading)
            return
        taken, size = [], 0
        for i in range(heading.part, len(self.parts)):
            taken.append(self.parts[i])
            size += len(self.parts[i])
            if size >= MAX_HEADING_CHARS:
                break
        title = " ".join("".join(taken)[:MAX_HEADING_CHARS].split())
        if title:
            self._anchors.append((heading.offset, heading.order, title))

    def write(self, text: str) -> None:
        if not text:
            return
        if self.pending and self.length:
            self.parts.append(self.pending)
            self.length += len(self.pending)
        self.pending = ""
        for heading in self._awaiting:  # the offset is where a heading's first character lands
            heading.offset, heading.part = self.length, len(self.parts)
        self._awaiting.clear()
        self.parts.append(text)
        self.length += len(text)

    def inline(self, text: str) -> None:
        """HTML text outside <pre>: runs of whitespace count as one space."""
        collapsed = re.sub(r"\s+", " ", text)
        if collapsed.startswith(" "):
            self.separate(" ")
        self.write(collapsed.strip())
        if collapsed.endswith(" ") and collapsed.strip():
            self.separate(" ")

    def text(self) -> str:
        return "".join(self.parts)


def _decode_html(data: bytes) -> str | bytes:
    if b"\x00" in data:
        raise ExtractionError("binary content, not HTML")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Not UTF-8: let Beautiful Soup use the declared <meta charset> or sniff.
        return data


def extract_html(data: bytes) -> tuple[str, list[Section]]:
    from bs4 import BeautifulSoup

    markup = _decode_html(data)
    try:
        soup = BeautifulSoup(markup, "html.parser")
    except MemoryError:
        raise  # the caller's limit, not a malformed document
    except Exception:
        raise ExtractionError("not a valid HTML document") from None

    out = _walk(soup)
    text = out.text()
    _refuse_control_heavy(text)
    return text, _sections_from_anchors(out.anchors, len(text))


def _walk(soup) -> _TextBuilder:
    """The text of a parsed document, blocks on their own lines, headings anchored."""
    from bs4.element import NavigableString, PreformattedString, Tag

    out = _TextBuilder()
    # Iterative walk (deeply nested markup must not hit the recursion limit).
    # Entries are nodes to enter, or ("end", tag) markers to leave a tag.
    stack: list = [soup]
    pre_depth = 0
    while stack:
        node = stack.pop()
        if isinstance(node, tuple):
            tag = node[1]
            if tag.name == "pre":
                pre_depth -= 1
            if len(node) == 3:
                out.close_heading(node[2])
            if tag.name in _HTML_BLOCKS or tag.name in _HTML_HEADINGS:
                out.separate("\n")
            continue
        if isinstance(node, NavigableString):
            # Comments, doctypes, CDATA and processing instructions are not text.
            if not isinstance(node, PreformattedString):
                if pre_depth:
                    out.write(str(node))
                else:
                    out.inline(str(node))
            continue
        if not isinstance(node, Tag):
            continue
        name = node.name
        if name in _HTML_SKIP:
            continue
        if name == "head":
            # Of the head, only the <title> is content.
            title = node.find("title")
            if title is not None:
                stack.append(title)
            continue
        if name == "br":
            out.separate("\n")
            continue
        if name in _HTML_BLOCKS or name in _HTML_HEADINGS:
            out.separate("\n")
        elif name in {"td", "th"}:  # cells of a row stay on one line
            out.separate(" ")
        if name == "pre":
            pre_depth += 1
        stack.append(("end", node, out.open_heading()) if name in _HTML_HEADINGS else ("end", node))
        stack.extend(reversed(node.contents))
    return out
