"""Untrusted text as Markdown that shows it literally, and the Markdown as a page that runs nothing: the run report's
escaping (`text`, `line`, `code`, `fence`) and rendering (`to_html`). Markdown escaping is written here because
markdown-it-py renders but has no escaper; the HTML side is markdown-it-py's own, with raw HTML off."""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from markdown_it.rules_inline import StateInline

# The page's own policy, in case anything ever slips through: no script, no fetch; only inline images and styles.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# What lets text become Markdown: emphasis, code spans, links and images, table cells, GitHub's strikethrough and
# math, and `#`/`+` (a heading or a list item where a value starts a line). `& < >` become entities instead.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]!|~$#+])")
_NEWLINE = re.compile(r"\r\n|\r|\n")  # what Markdown counts as a line break
# What GitHub-flavoured Markdown turns into a link without any brackets (autolink literals: `https://x`, `www.x`,
# `a@b.c`), as the Airflow UI renders a request's body: broken with a character reference, shown the same.
_AUTOLINK = re.compile(r"(?i):(?=//)|(?<=www)\.|@")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")
_PNG = re.compile(r"^data:image/png;base64,[a-z0-9+/=]*$")  # lower-cased: the charts, inline


def safe_link(url: str) -> bool:
    """A link or image may point to the web, stay relative, or be an inline PNG (the charts); never run anything
    (javascript:, vbscript:, data:text/html, an SVG's scripts, file:)."""
    url = re.sub(r"[\x00-\x20]", "", url).lower()  # browsers ignore controls and whitespace in a scheme
    scheme = _SCHEME.match(url)
    return scheme is None or scheme[1] in ("http", "https") or _PNG.match(url) is not None


def text(value: Any) -> str:
    """Untrusted text as literal Markdown: `& < >` as entities, the punctuation that would form Markdown
    backslash-escaped, line breaks as `<br>` (the one piece of HTML the report writes itself; `to_html` lets only
    that through), blanks at either end as character references (else they would open a code block, or keep
    `**` around a value from making it bold)."""
    escape = lambda line: _AUTOLINK.sub(lambda m: f"&#{ord(m[0])};",  # noqa: E731
                                        _MARKDOWN_PUNCTUATION.sub(r"\\\1", html.escape(line, quote=False)))
    escaped = "<br>".join(escape(line) for line in _NEWLINE.split(str(value)))
    return re.sub(r"^[ \t]+|[ \t]+$", lambda blanks: "".join(f"&#{ord(c)};" for c in blanks[0]), escaped)


def line(value: Any) -> str:
    """`text` that starts a Markdown line (a list item, a paragraph): not a list item of its own either."""
    return re.sub(r"^(\d{0,9})([-.)])", r"\1\\\2", text(value), count=1)


def code(value: Any, *, cell: bool = False) -> str:
    """A code span that no backtick run in `value` can close. A line break would end the paragraph (and could start
    a block of HTML), so it becomes the space a code span shows it as anyway; in a table `|` must be escaped even
    here (GFM)."""
    text = _NEWLINE.sub(" ", str(value))
    if not text:
        return ""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""  # CommonMark strips one space each side
    body = text.replace("|", "\\|") if cell else text
    return f"{fence}{pad}{body}{pad}{fence}"


def fence(text: str, info: str = "json") -> str:
    """A fenced block that no line of `text` can close."""
    fence = "`" * max(3, max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence}{info}\n{text}\n{fence}\n"


def _line_break(state: StateInline, silent: bool) -> bool:
    """The `<br>` `text` writes for a line break, with raw HTML off: data never holds a literal `<` (`text` writes
    `&lt;`), so this lets through only the report's own."""
    if not state.src.startswith("<br>", state.pos):
        return False
    if not silent:
        state.push("line_break", "br", 0)
    state.pos += len("<br>")
    return True


def to_html(md: str) -> str:
    """A self-contained page: the charts are inline data URIs. No raw HTML (but our `<br>`), links and images only
    to `safe_link`s, and a Content-Security-Policy that would stop a script even if one slipped through."""
    from markdown_it import MarkdownIt  # CommonMark with tables; Airflow already depends on it (through rich)

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    parser.validateLink = safe_link  # the default refuses four schemes and lets any other through
    parser.inline.ruler.before("autolink", "line_break", _line_break)
    parser.add_render_rule("line_break", lambda *_: "<br>")
    body = parser.render(md)
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:.2em .5em}"
             "table{border-collapse:collapse}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            f"<title>Run report</title><style>{style}</style></head><body>{body}</body></html>")
