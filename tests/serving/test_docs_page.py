"""/docs is one self-contained page: it loads nothing from elsewhere (FastAPI's pages load a CDN's scripts and
stay blank offline), and it lists every route of the OpenAPI schema."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from tests.serving.conftest import running_server


class Assets(HTMLParser):
    """Every URL the page would fetch by itself: scripts, stylesheets, images, frames."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img", "iframe") and values.get("src"):
            self.fetched.append(str(values["src"]))
        if tag == "link" and values.get("href"):
            self.fetched.append(str(values["href"]))


def test_docs_page_needs_no_network_and_lists_every_route(tiny_run):
    import httpx

    with running_server(tiny_run) as url:
        page = httpx.get(f"{url}/docs", timeout=30)
        schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = Assets()
    assets.feed(page.text)
    assert assets.fetched == [] and "<script" not in page.text
    assert not re.search(r"https?://", page.text)  # no link that needs the internet either
    routes = [f"{method.upper()} {path}" for path, methods in schema["paths"].items() for method in methods]
    assert len(routes) >= 4
    for route in routes:
        assert f"<code>{route}</code>" in page.text
