"""Plain text out of uploaded files: .txt, .md, .html, .docx and .pdf.

Pure functions over bytes held in memory: no HTTP, no database, and nothing is
ever written to disk. Every way an upload can be refused raises
:class:`ExtractionError` whose ``reason`` is a short sentence fit to show the
user; parser exceptions never escape.

Besides the text, :func:`extract` returns :class:`Section` spans (PDF pages,
Markdown/HTML headings) so that a chunk cut from the text can be traced back to
where it came from with :func:`page_and_heading_at`.
"""

from __future__ import annotations

import bisect
import io
import re
import unicodedata
import zipfile
from dataclasses import dataclass

__all__ = [
    "ExtractedDocument",
    "ExtractionError",
    "Section",
    "extract",
    "page_and_heading_at",
    "safe_filename",
]


class ExtractionError(Exception):
    """An upload that cannot be turned into text; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Section:
    """A span ``[char_start, char_end)`` of the extracted text and where it came from."""

    char_start: int
    char_end: int
    page: int | None = None  # 1-based PDF page
    heading: str | None = None  # nearest preceding Markdown/HTML heading


@dataclass(frozen=True)
class ExtractedDocument:
    text: str  # plain text, what gets indexed
    kind: str  # "text" | "markdown" | "html" | "docx" | "pdf"
    media_type: str
    # Contiguous spans covering the text in order; empty when the format has
    # neither pages nor headings (plain text, DOCX, a Markdown file without headings).
    sections: list[Section]


# extension (lower case, no dot) -> (kind, media type)
_TYPES: dict[str, tuple[str, str]] = {
    "txt": ("text", "text/plain"),
    "text": ("text", "text/plain"),
    "md": ("markdown", "text/markdown"),
    "markdown": ("markdown", "text/markdown"),
    "html": ("html", "text/html"),
    "htm": ("html", "text/html"),
    "docx": ("docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    "pdf": ("pdf", "application/pdf"),
}
_SUPPORTED = ", ".join("." + ext for ext in _TYPES)

# DOCX zip-bomb guard. zipfile never returns more bytes for a member than the
# size the archive declares for it (and checks the CRC), so the declared sizes
# are a trustworthy bound on what docx2txt can be made to inflate.
_DOCX_MAX_UNCOMPRESSED = 100_000_000
_DOCX_MAX_RATIO = 200
# Small, highly repetitive members (an empty styles part, say) can exceed the
# ratio without any danger; the ratio only matters for members of real size.
_DOCX_RATIO_MIN_SIZE = 1_000_000

_MAX_FILENAME_BYTES = 255
# Control characters that ordinary text files do contain.
_TEXT_CONTROLS = frozenset("\t\n\r\f\v")
_MAX_CONTROL_SHARE = 0.10


def safe_filename(name: str) -> str:
    """Return ``name`` unchanged if it is a plain file name, else raise.

    Refused: empty names, path separators, ``..`` anywhere, NUL and other
    control characters, and names over 255 bytes of UTF-8 (the usual file
    system limit).
    """
    if not name:
        raise ExtractionError("the file name is empty")
    if "/" in name or "\\" in name:
        raise ExtractionError("the file name must not contain '/' or '\\'")
    if ".." in name:
        raise ExtractionError("the file name must not contain '..'")
    if any(unicodedata.category(ch) == "Cc" for ch in name):  # Cc includes NUL
        raise ExtractionError("the file name must not contain control characters")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise ExtractionError("the file name is not valid Unicode") from None
    if len(encoded) > _MAX_FILENAME_BYTES:
        raise ExtractionError(f"the file name is longer than {_MAX_FILENAME_BYTES} bytes")
    return name


def extract(filename: str, data: bytes, max_bytes: int = 20_000_000) -> ExtractedDocument:
    """Extract indexable text from ``data``, typed by ``filename``'s extension."""
    kind, media_type = _file_type(filename)
    if not data:
        raise ExtractionError("the file is empty")
    if len(data) > max_bytes:
        raise ExtractionError(f"the file is larger than the {max_bytes:,}-byte limit")

    if kind == "text":
        text, sections = _decode_text(data), []
    elif kind == "markdown":
        text = _decode_text(data)
        sections = _markdown_sections(text)
    elif kind == "html":
        from app.ingest.html import extract_html  # it uses this module's errors and sections

        text, sections = extract_html(data)
    elif kind == "docx":
        text, sections = _extract_docx(data), []
    else:
        text, sections = _extract_pdf(data)

    if not text.strip():
        raise ExtractionError("no text could be extracted")
    return ExtractedDocument(text=text, kind=kind, media_type=media_type, sections=sections)


def page_and_heading_at(sections: list[Section], char_start: int) -> tuple[int | None, str | None]:
    """The page and heading of the section a chunk starting at ``char_start`` falls in.

    ``sections`` are in text order, as :func:`extract` returns them. A
    position past the end belongs to the last section; one before the first
    section (or an empty list) gives ``(None, None)``.
    """
    index = bisect.bisect_right([s.char_start for s in sections], char_start) - 1
    if index < 0:
        return None, None
    section = sections[index]
    return section.page, section.heading


# --- type and text decoding ---------------------------------------------------


def _file_type(filename: str) -> tuple[str, str]:
    # Only the last path component counts, whatever separator the client used.
    base = re.split(r"[\\/]", filename)[-1]
    ext = base.rpartition(".")[2].lower() if "." in base else ""
    if ext not in _TYPES:
        shown = f"'.{ext}'" if ext else "(no extension)"
        raise ExtractionError(f"unsupported file type {shown}; supported: {_SUPPORTED}")
    return _TYPES[ext]


def _decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM) text; anything binary-looking is refused.

    No guessing of legacy encodings: a file that is not UTF-8 is far more
    often a binary renamed to .txt than a Latin-1 text file, and indexing
    mojibake helps nobody.
    """
    if b"\x00" in data:
        raise ExtractionError("binary content, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ExtractionError("binary content, not text") from None
    _refuse_control_heavy(text)
    return text


def _refuse_control_heavy(text: str) -> None:
    # Valid UTF-8 can still be binary (e.g. mostly low ASCII control bytes).
    controls = sum(1 for ch in text if ch not in _TEXT_CONTROLS and unicodedata.category(ch) == "Cc")
    if text and controls / len(text) > _MAX_CONTROL_SHARE:
        raise ExtractionError("binary content, not text")


def _sections_from_anchors(anchors: list[tuple[int, str]], length: int) -> list[Section]:
    """Contiguous sections from (offset, heading) starts; text before the first has no heading."""
    if not anchors:
        return []
    sections: list[Section] = []
    if anchors[0][0] > 0:
        sections.append(Section(0, anchors[0][0]))
    for i, (start, heading) in enumerate(anchors):
        end = anchors[i + 1][0] if i + 1 < len(anchors) else length
        if end > start:  # two headings at one offset: the later one wins
            sections.append(Section(start, end, heading=heading))
    return sections


# --- Markdown -----------------------------------------------------------------

_ATX_HEADING = re.compile(r" {0,3}(#{1,6})(?=[ \t]|$)(.*)")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def _markdown_sections(text: str) -> list[Section]:
    """Sections from ATX headings (``#`` to ``######``), skipping fenced code."""
    anchors: list[tuple[int, str]] = []
    fence: str | None = None  # the opening fence while inside a code block
    offset = 0
    for line in text.splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        content = line.rstrip("\r\n")
        opening = _FENCE.match(content)
        if fence is not None:
            # A closing fence uses the same character, is at least as long, and has nothing after it.
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                if not content[opening.end() :].strip():
                    fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        match = _ATX_HEADING.match(content)
        if match:
            # Drop an optional closing sequence: "## Title ##" -> "Title".
            heading = re.sub(r"(?:^|[ \t])#+$", "", match.group(2).strip()).strip()
            if heading:
                anchors.append((start, heading))
    return _sections_from_anchors(anchors, len(text))


# --- HTML: app/ingest/html.py -------------------------------------------------


# --- DOCX ---------------------------------------------------------------------


def _extract_docx(data: bytes) -> str:
    import docx2txt

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except Exception:
        raise ExtractionError("not a valid DOCX") from None
    with archive:
        if "word/document.xml" not in archive.namelist():
            raise ExtractionError("not a valid DOCX (word/document.xml is missing)")
        # Check the declared sizes before anything is inflated.
        total = sum(m.file_size for m in members)
        too_dense = any(
            m.file_size > _DOCX_RATIO_MIN_SIZE and m.file_size > _DOCX_MAX_RATIO * max(m.compress_size, 1)
            for m in members
        )
        if total > _DOCX_MAX_UNCOMPRESSED or too_dense:
            raise ExtractionError("compressed archive too large when expanded (zip bomb?)")
    try:
        return docx2txt.process(io.BytesIO(data))
    except Exception:
        # Bad XML, encrypted members, CRC errors, ...
        raise ExtractionError("not a valid DOCX") from None


# --- PDF ----------------------------------------------------------------------


def _extract_pdf(data: bytes) -> tuple[str, list[Section]]:
    # pypdf caps stream decompression itself (pypdf.filters.*_MAX_OUTPUT_LENGTH).
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        encrypted = reader.is_encrypted
    except Exception:
        raise ExtractionError("not a valid PDF") from None
    if encrypted:
        raise ExtractionError("the PDF is encrypted (password-protected)")
    try:
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except Exception:
        raise ExtractionError("not a valid PDF") from None
    if not any(pages):
        raise ExtractionError("no text could be extracted (a scanned PDF without a text layer?)")

    # Pages joined by blank lines; each section runs up to the next page's
    # start, so the separator belongs to the page before it.
    starts: list[int] = []
    offset = 0
    for page_text in pages:
        starts.append(offset)
        offset += len(page_text) + 2
    text = "\n\n".join(pages)
    sections = [
        Section(start, starts[i + 1] if i + 1 < len(starts) else len(text), page=i + 1)
        for i, start in enumerate(starts)
    ]
    return text, sections
