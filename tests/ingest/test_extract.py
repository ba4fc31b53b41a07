"""Text extraction from uploads: fixtures are built in memory by the tests."""

from __future__ import annotations

import io
import os
import zipfile

import pytest

from app.ingest.extract import (
    ExtractedDocument,
    ExtractionError,
    Section,
    extract,
    page_and_heading_at,
    safe_filename,
)

# --- fixture builders -----------------------------------------------------------

W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def make_docx(paragraphs: list[str]) -> bytes:
    """A minimal but real DOCX: content types, package relationships, document part."""
    body = "".join(f"<w:p><w:r><w:t>{p}</w:t></w:r></w:p>" for p in paragraphs)
    parts = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/word/document.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
            "</Types>"
        ),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" '
            'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
            'Target="word/document.xml"/>'
            "</Relationships>"
        ),
        "word/document.xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<w:document xmlns:w="{W_NS}"><w:body>{body}</w:body></w:document>'
        ),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in parts.items():
            zf.writestr(name, content)
    return buf.getvalue()


def make_zip_bomb(uncompressed: int) -> bytes:
    """A 'DOCX' whose word/document.xml is ``uncompressed`` bytes of zeros, written in chunks."""
    buf = io.BytesIO()
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        with zf.open("word/document.xml", "w") as member:
            left = uncompressed
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return buf.getvalue()


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per page, xref offsets computed here."""
    n = len(pages)
    font_id = 3 + 2 * n
    page_ids = [3 + 2 * i for i in range(n)]
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>".encode(),
        font_id: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for page_id, line in zip(page_ids, pages, strict=True):
        stream = f"BT /F1 12 Tf 72 720 Td {_pdf_string(line)} Tj ET".encode()
        objects[page_id] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> /Contents {page_id + 1} 0 R >>"
        ).encode()
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for obj_id in sorted(objects):
        offsets[obj_id] = len(out)
        out += b"%d 0 obj\n" % obj_id + objects[obj_id] + b"\nendobj\n"
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n" % size
    out += b"0000000000 65535 f \n"
    for obj_id in range(1, size):
        out += b"%010d 00000 n \n" % offsets[obj_id]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


def reasons(exc_info: pytest.ExceptionInfo[ExtractionError]) -> str:
    return exc_info.value.reason


# --- plain text ---------------------------------------------------------------


def test_text_plain_utf8_with_bom():
    doc = extract("Notes.TXT", "\ufeffcafé au lait\nsecond line\n".encode())
    assert doc == ExtractedDocument("café au lait\nsecond line\n", "text", "text/plain", [])
    assert extract("a.text", b"hello").kind == "text"


@pytest.mark.parametrize(
    "data",
    [
        b"abc\x00def",  # NUL
        b"\xff\xfe\x00h\x00i",  # UTF-16
        b"\x89PNG\r\n\x1a\n\xc3\x28 not utf-8",  # invalid UTF-8
        b"\x01\x02\x03\x04 ab",  # valid UTF-8 but mostly control characters
    ],
)
def test_binary_named_txt_refused(data):
    with pytest.raises(ExtractionError) as exc:
        extract("photo.txt", data)
    assert reasons(exc) == "binary content, not text"


def test_text_with_a_few_controls_is_fine():
    text = "log line \x1b[1mbold\x1b[0m and more words to dilute the escapes\n"
    assert extract("run.log.txt", text.encode()).text == text


def test_empty_and_whitespace_refused():
    with pytest.raises(ExtractionError) as exc:
        extract("empty.txt", b"")
    assert "empty" in reasons(exc)
    with pytest.raises(ExtractionError) as exc:
        extract("empty.pdf", b"")
    assert "empty" in reasons(exc)
    for name in ("blank.txt", "blank.md", "blank.html"):
        with pytest.raises(ExtractionError) as exc:
            extract(name, b" \n\t \r\n ")
        assert reasons(exc) == "no text could be extracted"


def test_html_with_only_markup_is_empty():
    with pytest.raises(ExtractionError) as exc:
        extract("x.html", b"<html><head><script>var a = 1;</script></head><body>  </body></html>")
    assert reasons(exc) == "no text could be extracted"


def test_over_max_bytes():
    with pytest.raises(ExtractionError) as exc:
        extract("big.txt", b"a" * 101, max_bytes=100)
    assert "100" in reasons(exc) and "limit" in reasons(exc)
    assert extract("ok.txt", b"a" * 100, max_bytes=100).text == "a" * 100


@pytest.mark.parametrize("name", ["setup.exe", "archive.tar.gz", "README", "doc.docx.exe"])
def test_unsupported_extension(name):
    with pytest.raises(ExtractionError) as exc:
        extract(name, b"MZ\x90\x00")
    assert reasons(exc).startswith("unsupported file type")
    assert ".pdf" in reasons(exc) and ".docx" in reasons(exc)
    if name == "setup.exe":
        assert "'.exe'" in reasons(exc)


# --- Markdown -----------------------------------------------------------------

MARKDOWN = """Intro paragraph before any heading.

# Title

Some text.

```python
# not a heading, just a comment
x = 1
```

## Part Two ##

More text.
~~~
# also not a heading
~~~
###### Deep
end
"""


def test_markdown_sections():
    doc = extract("guide.md", MARKDOWN.encode())
    assert doc.kind == "markdown" and doc.media_type == "text/markdown"
    assert doc.text == MARKDOWN  # raw Markdown is indexed as is
    assert [s.heading for s in doc.sections] == [None, "Title", "Part Two", "Deep"]
    # Sections are contiguous, cover the whole text and start at their heading line.
    assert doc.sections[0].char_start == 0
    assert doc.sections[-1].char_end == len(doc.text)
    for a, b in zip(doc.sections, doc.sections[1:]):
        assert a.char_end == b.char_start
    assert doc.text[doc.sections[1].char_start :].startswith("# Title\n")
    assert doc.text[doc.sections[2].char_start :].startswith("## Part Two ##")
    assert all(s.page is None for s in doc.sections)

    comment_at = doc.text.index("# not a heading")
    assert page_and_heading_at(doc.sections, comment_at) == (None, "Title")
    assert page_and_heading_at(doc.sections, doc.text.index("More text")) == (None, "Part Two")
    assert page_and_heading_at(doc.sections, 0) == (None, None)


def test_markdown_without_headings_has_no_sections():
    doc = extract("n.markdown", b"just text\n#hashtag is not a heading\n")
    assert doc.sections == []


# --- HTML ---------------------------------------------------------------------

HTML = b"""<!DOCTYPE html>
<html><head><title>The Page</title><style>body { color: red }</style>
<script>alert("tracking")</script><meta charset="utf-8"></head>
<body>
<noscript>enable javascript</noscript>
<p>Before   the
   headings.</p>
<!-- a comment -->
<h1>Main <em>Heading</em></h1>
<p>First <b>bold</b> paragraph.</p><div>Second block</div>
<script type="text/javascript">var secret = "do not index";</script>
<h2>Sub</h2>
<ul><li>one</li><li>two</li></ul>
<template><p>template text</p></template>
<pre>line 1
  line 2</pre>
</body></html>
"""


def test_html_text_and_sections():
    doc = extract("page.HTM", HTML)
    assert doc.kind == "html" and doc.media_type == "text/html"
    text = doc.text
    for hidden in ("tracking", "color", "secret", "enable javascript", "template text", "a comment", "DOCTYPE"):
        assert hidden not in text
    assert text.startswith("The Page\nBefore the headings.\nMain Heading\n")
    assert "First bold paragraph.\nSecond block\n" in text
    assert "one\ntwo" in text
    assert "line 1\n  line 2" in text  # <pre> keeps its whitespace
    assert text == text.strip()

    assert [s.heading for s in doc.sections] == [None, "Main Heading", "Sub"]
    assert text[doc.sections[1].char_start :].startswith("Main Heading")
    assert text[doc.sections[2].char_start :].startswith("Sub\none")
    assert doc.sections[0].char_start == 0 and doc.sections[-1].char_end == len(text)
    assert page_and_heading_at(doc.sections, text.index("Second block")) == (None, "Main Heading")
    assert page_and_heading_at(doc.sections, text.index("two")) == (None, "Sub")
    assert page_and_heading_at(doc.sections, text.index("Before")) == (None, None)


def test_html_table_rows_and_line_breaks():
    data = b"<table><tr><th>k</th><td>a</td><td>b</td></tr><tr><td>c</td></tr></table><p>x<br>y</p>"
    assert extract("t.html", data).text == "k a b\nc\nx\ny"


def test_html_latin1_with_meta_charset():
    data = '<html><head><meta charset="iso-8859-1"></head><body><p>café</p></body></html>'.encode("latin-1")
    assert extract("old.html", data).text == "café"


def test_html_deep_nesting_does_not_recurse():
    data = b"<div>" * 5000 + b"deep" + b"</div>" * 5000
    assert extract("deep.html", data).text == "deep"


# --- DOCX ---------------------------------------------------------------------


def test_docx():
    doc = extract("report.docx", make_docx(["First paragraph here.", "Second paragraph &amp; more."]))
    assert doc.kind == "docx"
    assert doc.media_type == "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    assert "First paragraph here." in doc.text
    assert "Second paragraph & more." in doc.text
    assert doc.text.index("First") < doc.text.index("Second")
    assert doc.sections == []
    assert page_and_heading_at(doc.sections, 0) == (None, None)


def test_corrupt_docx():
    with pytest.raises(ExtractionError) as exc:
        extract("bad.docx", os.urandom(4096))
    assert reasons(exc) == "not a valid DOCX"


def test_docx_truncated():
    data = make_docx(["hello"])
    with pytest.raises(ExtractionError) as exc:
        extract("cut.docx", data[: len(data) // 2])
    assert reasons(exc) == "not a valid DOCX"


def test_docx_bad_xml_and_missing_document():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("word/document.xml", "<w:document><unclosed>")
    with pytest.raises(ExtractionError) as exc:
        extract("badxml.docx", buf.getvalue())
    assert reasons(exc) == "not a valid DOCX"

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hello.txt", "not a docx")
    with pytest.raises(ExtractionError) as exc:
        extract("other.docx", buf.getvalue())
    assert "not a valid DOCX" in reasons(exc) and "word/document.xml" in reasons(exc)


def test_docx_zip_bomb_total_size():
    bomb = make_zip_bomb(150_000_000)
    assert len(bomb) < 1_000_000  # ~150 KB on the wire
    with pytest.raises(ExtractionError) as exc:
        extract("bomb.docx", bomb)
    assert reasons(exc) == "compressed archive too large when expanded (zip bomb?)"


def test_docx_zip_bomb_ratio():
    bomb = make_zip_bomb(20_000_000)  # under the total cap, but ~1000:1
    with pytest.raises(ExtractionError) as exc:
        extract("dense.docx", bomb)
    assert "zip bomb" in reasons(exc)


# --- PDF ----------------------------------------------------------------------


def test_pdf_two_pages():
    data = make_pdf(["Hello from page one (alpha)", "Greetings from page two beta"])
    doc = extract("paper.pdf", data)
    assert doc.kind == "pdf" and doc.media_type == "application/pdf"
    first, second = doc.text.split("\n\n")
    assert "Hello" in first and "page one" in first and "alpha" in first
    assert "Greetings" in second and "beta" in second
    assert [s.page for s in doc.sections] == [1, 2]
    assert all(s.heading is None for s in doc.sections)
    assert doc.sections[0] == Section(0, len(first) + 2, page=1)
    assert doc.sections[1] == Section(len(first) + 2, len(doc.text), page=2)
    assert page_and_heading_at(doc.sections, doc.text.index("Greetings")) == (2, None)
    assert page_and_heading_at(doc.sections, doc.text.index("alpha")) == (1, None)


def test_pdf_without_text():
    with pytest.raises(ExtractionError) as exc:
        extract("scan.pdf", make_pdf([""]))
    assert "no text could be extracted" in reasons(exc)


@pytest.mark.parametrize("kind", ["random", "truncated", "header-only"])
def test_corrupt_pdf(kind):
    if kind == "random":
        data = os.urandom(4096)
    elif kind == "truncated":
        data = make_pdf(["one", "two"])[:60]
    else:
        data = b"%PDF-1.7\n"
    with pytest.raises(ExtractionError) as exc:
        extract("broken.pdf", data)
    assert reasons(exc) == "not a valid PDF"


def test_encrypted_pdf():
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["secret words"]))))
    writer.encrypt(user_password="pw", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    with pytest.raises(ExtractionError) as exc:
        extract("locked.pdf", buf.getvalue())
    assert "encrypted" in reasons(exc)


# --- file names and sections --------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "a/b.txt", "/etc/passwd", "a\\b.txt", "..", "../x.txt", "x..txt", "a\x00.txt", "a\nb.txt", "a\x7f.txt"],
)
def test_safe_filename_refuses(name):
    with pytest.raises(ExtractionError) as exc:
        safe_filename(name)
    assert reasons(exc)


def test_safe_filename_length_in_bytes():
    assert safe_filename("é" * 127 + ".") == "é" * 127 + "."  # 255 bytes
    with pytest.raises(ExtractionError) as exc:
        safe_filename("é" * 128)  # 256 bytes, 128 characters
    assert "255" in reasons(exc)


@pytest.mark.parametrize("name", ["report.pdf", "My Notes (v2).md", "résumé.docx", ".hidden.txt", "a b.c.txt"])
def test_safe_filename_accepts(name):
    assert safe_filename(name) == name


def test_page_and_heading_at():
    sections = [Section(0, 10, page=1), Section(10, 20, page=2, heading="H"), Section(20, 25, page=3)]
    assert page_and_heading_at(sections, 0) == (1, None)
    assert page_and_heading_at(sections, 9) == (1, None)
    assert page_and_heading_at(sections, 10) == (2, "H")
    assert page_and_heading_at(sections, 24) == (3, None)
    assert page_and_heading_at(sections, 99) == (3, None)  # past the end: last section
    assert page_and_heading_at(sections, -1) == (None, None)
    assert page_and_heading_at([], 5) == (None, None)
    assert page_and_heading_at([Section(5, 9, heading="Late")], 2) == (None, None)


def test_extraction_error_reason():
    err = ExtractionError("not a valid PDF")
    assert err.reason == "not a valid PDF" and str(err) == "not a valid PDF"


def test_nested_headings_are_titled_from_a_bounded_part_of_their_text():
    # Each heading used to read its whole subtree: 36 KB of nested <h1> built
    # 17 million characters of titles, and 240 KB would have run for minutes.
    from app.ingest.html import MAX_HEADING_CHARS, extract_html

    levels = 16_000
    text, sections = extract_html(("<h1>level " * levels + "</h1>" * levels).encode())
    assert text == "\n".join(["level"] * levels)  # headings are blocks
    titled = [s for s in sections if s.heading]
    assert len(titled) == levels
    assert all(len(s.heading) <= MAX_HEADING_CHARS for s in titled)
    assert [s.char_start for s in titled] == [6 * i for i in range(levels)]  # each where its own text starts
    assert titled[-1].heading == "level"


def test_a_heading_nested_in_another_starts_its_own_section_and_empty_ones_none():
    from app.ingest.html import extract_html

    text, sections = extract_html(b"<h1>Top <h2>Inner</h2> tail</h1><h3></h3><p>Body text</p>")
    assert text == "Top\nInner\ntail\nBody text"
    assert [(text[s.char_start : s.char_end], s.heading) for s in sections] == [
        ("Top\n", "Top Inner tail"),
        ("Inner\ntail\nBody text", "Inner"),
    ]
