"""The run report never renders untrusted text as markup: every field a run's data or its user decides (prompts,
references and answers, each candidate's and the base model's generations, the examples that changed most,
candidate keys, overrides, status and why, metric names from the user's lm-eval tasks, params, the run prefix,
artifact paths, the figures read from the stages' documents) is fed markup, script and Markdown, and the pages are
parsed for what survived. The report shows no error text (failures go to the task log), so there is none to feed.

`report.md` alone must be inert even to a renderer that passes raw HTML through; `report.html` must be inert, read
correctly in Chromium, and keep its inline charts. Set GEMMA_PIPELINE_SCREENSHOT_DIR to keep the browser's
screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from string import Formatter
from typing import Any
from urllib.parse import urlsplit

import pytest
from gemma_pipeline.plan import markup, report
from markdown_it import MarkdownIt

from jobs.contract import stages
from tests.support import nonempty
from tests.support.browser import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip
from tests.support.generations import generation_row, metric

PAYLOADS = [
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<svg onload=alert(1)>",
    '<a href="javascript:alert(1)">x</a>', "\"'><iframe src=javascript:alert(1)></iframe><object data=x></object>",
    "[click](javascript:alert(1))", "![x](javascript:alert(1))", "javascript:alert(1)",
    "[phish](https://example.com/login) ![pixel](https://example.com/p.png)",
    "![x](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)", "<https://example.com> <javascript:alert(1)>",
    "[ref]: javascript:alert(1)", "`code` ``two`` ```", "```\n<script>alert(1)</script>\n```", "a | b || c\\|",
    "line one\nline two\n\n# heading\n- item\n---", "cr\r<b>x</b>\r\nend", "*em* _em_ **strong** ~~gone~~ \\*x\\* $x$",
    "&lt;script&gt; &amp; &#106;avascript:alert(1)", "- item", "1. one", "# heading", "> quote", "    indented code",
]
ALLOWED = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "thead", "tbody", "tr",
           "th", "td", "code", "pre", "img", "a", "ul", "li", "strong", "em", "br"}
UNITS = {"h1", "h2", "h3", "p", "th", "td", "li", "pre", "code", "strong"}  # elements whose text the checks read


class Page(HTMLParser):
    """Every element with its attributes, and the text of each unit in `UNITS` (a `<br>` as the line it breaks)."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.units: list[tuple[str, str]] = []
        self._open: list[tuple[str, list[str]]] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "br":
            self.handle_data("\n")
        elif tag in UNITS:
            self._open.append((tag, []))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            name, parts = self._open.pop()
            self.units.append((name, "".join(parts).strip()))

    def handle_data(self, data: str) -> None:
        for _, parts in self._open:
            parts.append(data)


def _generations(texts: list[str]) -> list[dict[str, Any]]:
    """One example per text, every text field that text; even examples gain on the base model (most first), odd
    ones lose (most first), so both tables of the examples that changed most have rows."""
    gain = lambda i: (len(texts) - i) / 20 * (1 if i % 2 == 0 else -1)  # noqa: E731
    return [generation_row(i, 0.5 + gain(i), 0.5, prompt=t, reference=t, answer=t, base_answer=t) for i, t in enumerate(texts)]


def _built(value: str, answers: list[dict[str, str]] | None = None, generated: list[str] | None = None) -> dict:
    """A finished run whose every untrusted field is `value`; its candidates generated `generated` (default: two
    examples of `value`)."""
    manifest = {"wall_time_s": 10.0, "peak_rss_bytes": 2**30, "metrics": {"steps": value}}
    answers = answers or [dict.fromkeys(("prompt", "reference", "before", "after"), value)]
    documents = {"benchmark": {"mode": value, "models": {}}, "answers": answers,
                 "parity": {"passed": False, "logits_max_abs_diff": value, "tolerance": value, "note": value}}
    task = f"{value}:acc"  # an lm-eval task's name is the user's; its metric is the champion metric here
    metrics = {"rouge_l": metric(value, value, value), "stop_rate": metric(value, value, value), task: metric(0.5)}
    row = {"overrides": {value: value}, "key": value, "status": value,
           "prefixes": {s: f"{value}/{s}" for s in stages.NAMES},  # the artifacts' paths
           "metrics": metrics, "base_metrics": metrics, "vs_base": {task: metric(value, value, value)}}
    champion = {"champion": value, "index": 0, "why": value, "champion_metric": {"name": task, "higher_is_better": True},
                "pairwise": {value: metric(value, value, value)},
                "generation": {"max_new_tokens": value, "examples": value, "sampling": value},
                "candidates": [{**row, "champion": True}, {**row, "champion": False}]}
    usages = {s: {"backend": "gke", "profile": value, "seconds": 10.0} for s in stages.NAMES}
    return report.build(value, {"run_name": value, value: [value]}, dict.fromkeys(stages.NAMES, manifest), documents,
                        usages, {"cpu": 0.2}, champion, generations={value: _generations(generated or [value] * 2)})


def _strict(md: str) -> str:
    """A renderer that passes raw HTML through: the Markdown's own escaping must be enough."""
    return MarkdownIt("commonmark").enable("table").render(md)


def _safe_url(tag: str, url: str) -> bool:
    url = url.strip().lower()
    return urlsplit(url).scheme in ("", "http", "https") or (tag == "img" and url.startswith("data:image/png;base64,"))


def _assert_inert(page: Page, baseline: Page) -> None:
    tags = nonempty(page.tags, "elements")
    assert {tag for tag, _ in tags} <= ALLOWED, {tag for tag, _ in tags} - ALLOWED
    for tag, attrs in tags:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        assert all(_safe_url(tag, attrs[name] or "") for name in ("href", "src") if name in attrs), (tag, attrs)
    # The same elements as a run with harmless values: nothing in the data became an element (but line breaks).
    assert [t for t, _ in tags if t != "br"] == [t for t, _ in baseline.tags if t != "br"]


def _assert_reads_as_text(page: Page, value: str, artifacts: int) -> None:
    shown = re.sub(r"\r\n?", "\n", value)  # a line break, however written, shows as one
    units = nonempty(page.units, "text")
    count = lambda tag, text: units.count((tag, text.strip()))  # noqa: E731
    # the exported champion's answers, statuses, the runner-up (candidates, metrics, differences and pairwise
    # tables), profiles, steps; 2 examples x 5 answers side by side; 2 examples x 4 texts that changed most
    assert count("td", shown) == 4 + 2 + 4 + len(stages.NAMES) + 1 + 2 * 5 + 2 * 4
    # the champion in the candidates, metrics and differences tables, and heading its answers side by side
    assert count("strong", shown) == 4 and count("td", f"{shown} (champion)") == 3
    assert count("th", f"{shown} (champion)") == 1 and count("th", shown) == 1
    assert count("th", f"{shown}:acc ★ (champion metric, higher is better)") == 2  # metrics, differences
    # ROUGE-L and stop rate of base and both candidates, both differences, the pairwise one
    assert count("td", f"{shown} ({shown}–{shown})") == 2 * 3 + 2 + 1
    assert count("p", f"Answers generated for {shown} eval examples, {shown}, at most {shown} new tokens each.") == 1
    assert count("p", f"Stop rate: the share of answers that ended with the model's end-of-turn within "
                      f"max_new_tokens ({shown}); the rest were cut off.") == 1
    assert count("p", f"{shown}.") == 1  # why
    assert count("td", f"perplexity before ({shown} mode, eval split)") == 1
    assert count("td", f"FAILED (max logit diff {shown}, tolerance {shown})") == 1
    assert count("code", re.sub(r"\r\n?|\n", " ", value)) == 1  # the run prefix
    assert count("code", json.dumps({value: value})) == 2  # each candidate's overrides
    assert len([t for tag, t in units if tag == "pre" and json.dumps(value) in t]) == 2  # parity, params
    assert len([t for tag, t in units if tag == "li" and t.startswith(f"{shown.strip()}/")]) == artifacts > 0


@pytest.mark.parametrize("value", PAYLOADS)
def test_untrusted_text_stays_text_in_both_pages(value: str) -> None:
    built, harmless = _built(value), _built("harmless")
    artifacts = sum(map(len, built["artifacts"].values()))
    relative, inline = {"loss curve": "finetune/loss_curve.png"}, {"loss curve": "data:image/png;base64,iVBORw0KGgo="}
    pages = {"report.md, raw HTML on": tuple(_strict(report.markdown(b, relative)) for b in (built, harmless)),
             "report.html": tuple(markup.to_html(report.markdown(b, inline)) for b in (built, harmless))}
    for name, (page, baseline) in pages.items():
        parsed = Page(page)
        _assert_inert(parsed, Page(baseline))
        _assert_reads_as_text(parsed, value, artifacts)
        assert any(tag == "img" for tag, _ in parsed.tags), name  # the chart is still there


@pytest.mark.parametrize("raw", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<svg onload=alert(1)>",
                                 '<a href="https://example.com">x</a>', "<div>\n<iframe src=x></iframe>\n</div>"])
def test_the_page_passes_no_raw_html_but_its_own_line_breaks(raw: str) -> None:
    page = Page(markup.to_html(f"{raw}<br>{raw}"))
    body = [tag for tag, _ in page.tags][page.tags.index(("body", {})) + 1:]
    assert body == ["p", "br"], body
    assert nonempty(page.units, "text")[0] == ("p", f"{raw}\n{raw}"), page.units


@pytest.mark.parametrize("url,allowed", [
    ("https://example.com/x", True), ("http://example.com", True), ("finetune/loss_curve.png", True), ("#top", True),
    ("data:image/png;base64,iVBORw0KGgo=", True), ("javascript:alert(1)", False), ("JaVaScRiPt:alert(1)", False),
    ("&#106;avascript:alert(1)", False), ("vbscript:msgbox(1)", False), ("data:text/html;base64,PHNjcmlwdD4=", False),
    ("data:image/svg+xml;base64,PHN2Zz4=", False), ("data:image/gif;base64,R0lGOD", False), ("file:///etc/passwd", False),
    ("ms-settings:display", False),
])
def test_the_page_links_only_to_safe_schemes(url: str, allowed: bool) -> None:
    page = Page(markup.to_html(f"[link]({url}) ![image]({url})"))
    links = [attrs.get({"a": "href", "img": "src"}[tag]) for tag, attrs in page.tags if tag in ("a", "img")]
    assert len(links) == (2 if allowed else 0), links


def test_an_unsafe_chart_reference_is_left_out() -> None:
    md = report.markdown(_built("x"), {"loss curve": "javascript:alert(1)", "perplexity": "x) ![y](javascript:alert(1)"})
    page = Page(_strict(md))
    images = nonempty([attrs for tag, attrs in page.tags if tag == "img"], "charts")
    # Only the second, a relative path, its `)` and blank percent-encoded so that nothing in it ends the image.
    assert len(images) == 1 and images[0]["src"].startswith("x%29%20") and urlsplit(images[0]["src"]).scheme == "", images
    assert "(javascript:" not in md and not [tag for tag, _ in page.tags if tag == "a"]


def test_the_page_carries_a_content_security_policy() -> None:
    meta = [attrs for tag, attrs in Page(markup.to_html("# x")).tags if tag == "meta" and attrs.get("http-equiv")]
    assert meta == [{"http-equiv": "Content-Security-Policy", "content": markup.CSP}]
    assert markup.CSP == "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _png() -> bytes:
    """A 1x1 grey PNG: a chart the page must still show under its Content-Security-Policy."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def test_the_page_runs_nothing_in_chromium_and_reads_as_the_answers(tmp_path: Path) -> None:
    browser_or_skip()
    from playwright.sync_api import sync_playwright

    pwn = '<img src=x onerror="window.__pwned=1">'
    answers = [pwn, '<svg onload="window.__pwned=1">', "<script>window.__pwned=1</script>", "<img src=x onerror=alert(1)>",
               "[click](javascript:alert(1))", "two\nlines | pipe", "```\nfence\n```", '<a href="javascript:alert(1)">x</a>']
    built = _built(pwn, [{"prompt": a, "reference": a, "before": a, "after": a} for a in answers], answers)
    chart = "data:image/png;base64," + base64.b64encode(_png()).decode()
    path = tmp_path / "report.html"
    path.write_text(markup.to_html(report.markdown(built, {"loss curve": chart})))
    shot = Path(os.environ.get("GEMMA_PIPELINE_SCREENSHOT_DIR") or tmp_path) / "run-report-safety.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    dialogs: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(path.as_uri(), wait_until="load")
        page.screenshot(path=str(shot), full_page=True)
        print(f"run report screenshot: {shot}")
        pwned = page.evaluate("typeof window.__pwned")
        cells = page.locator(f"h2:text-is('{report.EXPORT_CHECK_TITLE}') + p + table td").all_inner_texts()
        side_by_side = page.locator("h2:text-is('Answers side by side') + p + table td").all_inner_texts()
        changed = {title: page.locator(f"h3:text-is('{title}') + table td").all_inner_texts()
                   for title in ("Improved most", "Regressed most")}
        live = page.locator("script, svg, iframe, object, embed, a, [onerror], [onload]").count()
        width = page.evaluate("document.querySelector('img').naturalWidth")
        browser.close()
    assert dialogs == [] and pwned == "undefined" and live == 0, f"{dialogs} {pwned} {live}; screenshot {shot}"
    assert errors == [], f"the browser refused or failed something (CSP?): {errors}; screenshot {shot}"
    assert cells == [a for a in answers for _ in range(4)], f"screenshot {shot}"
    # The first five examples: prompt, reference, the base model's answer and both candidates' (the same here).
    assert side_by_side == [a for a in answers[:5] for _ in range(5)], f"screenshot {shot}"
    # By `_generations`: even examples gained, odd ones lost, the earlier ones most; base ROUGE-L 0.5 throughout.
    for title, key, indexes in (("Improved most", "improved", (0, 2, 4)), ("Regressed most", "regressed", (1, 3, 5))):
        scores = [f"{c['score']:.3f}" for c in built["most_changed"][key]]
        expected = [[answers[i]] * 4 + ["0.500", score] for i, score in zip(indexes, scores, strict=True)]
        assert changed[title] == [cell for row in expected for cell in row], f"{title}; screenshot {shot}"
    assert width == 1, f"the inline chart did not load; screenshot {shot}"


# The only links the DAG shows in the UI are the provider's Kubernetes Job links, built from these: deployment settings
# (Composer environment variables) and the stage's Job name, never a trigger-form value.
LINK_FIELDS = {"location": "location", "cluster_name": "cluster_name", "namespace": "namespace", "job_name": "name",
               "project_id": "project_id"}


def test_what_the_dag_shows_in_the_ui_holds_no_run_input(dag: Any) -> None:
    parser = MarkdownIt("commonmark").enable("table")
    texts = [dag.doc_md, dag.description, *(dag.params.get_param(name).description or "" for name in dag.params)]
    for text in nonempty(texts, "UI texts"):
        tokens = [t for block in parser.parse(text) for t in [block, *(block.children or [])]]
        assert not [t.type for t in tokens if t.type.startswith(("html", "link", "image"))], text
    assert not [n for n in dag.params if {"description_html", "description_md"} & set(dag.params.get_param(n).schema)]
    for task in nonempty([t for t in dag.tasks if t.operator_extra_links], "tasks with links"):
        kwargs = getattr(task, "partial_kwargs", None)  # a mapped task keeps its arguments here
        mapped = set(task.expand_input.value) if kwargs is not None else set()
        for link in task.operator_extra_links:
            fields = {f for _, f, _, _ in Formatter().parse(link.format_str) if f}
            assert fields <= set(LINK_FIELDS), fields - set(LINK_FIELDS)
            for field in fields:
                attr = LINK_FIELDS[field]
                value = getattr(task, attr) if kwargs is None else kwargs.get(attr, dag.default_args.get(attr))
                assert attr not in mapped and isinstance(value, str) and "{{" not in value, (task.task_id, attr, value)


@pytest.mark.parametrize("value", ["https://evil.com/x", "see www.evil.com now", "mail me@evil.com", "HTTP://EVIL.COM",
                                   "ftp://evil.com/f"])
def test_text_makes_no_link_even_where_markdown_links_bare_addresses(value: str) -> None:
    """The Airflow UI renders an approval request's body as GitHub-flavoured Markdown, which links bare addresses
    (autolink literals); markdown-it's linkifying GFM preset stands in for it here."""
    linkify = MarkdownIt("gfm-like")
    assert "<a " in linkify.render(value)  # the renderer does link the raw text
    page = linkify.render(markup.text(value))
    assert "<a " not in page and Page(page).units == [("p", value)], page
