"""/docs: the OpenAPI schema as one self-contained page (FastAPI's Swagger UI and ReDoc load their scripts
from a CDN, so they are blank offline)."""

from __future__ import annotations

import json
from typing import Any


def add_docs(app: Any) -> None:
    """GET /docs, left out of the schema it shows."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        """The API's routes, request bodies and answers, from the OpenAPI schema, in one page with no assets."""
        from fastapi.responses import HTMLResponse

        return HTMLResponse(docs_page(app.openapi()))


def docs_page(schema: dict[str, Any]) -> str:
    """Every route with its summary, request body schema and answers, as plain HTML: it needs no script or
    stylesheet from elsewhere, so it shows offline (FastAPI's Swagger UI and ReDoc load theirs from a CDN)."""
    import html

    components = schema.get("components", {}).get("schemas", {})

    def resolved(node: Any, seen: frozenset[str] = frozenset()) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                return {"$ref": name} if name in seen else resolved(components.get(name, {}), seen | {name})
            return {key: resolved(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [resolved(value, seen) for value in node]
        return node

    info = schema.get("info", {})
    parts = [
        f"<h1>{html.escape(str(info.get('title', 'API')))} {html.escape(str(info.get('version', '')))}</h1>",
        f"<p>{html.escape(str(info.get('summary') or info.get('description') or ''))}</p>",
        '<p>The machine-readable schema: <a href="openapi.json">openapi.json</a>.</p>',
    ]
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            title = f"{method.upper()} {path}"
            parts.append(f'<h2 id="{html.escape(title)}"><code>{html.escape(title)}</code></h2>')
            text = operation.get("description") or operation.get("summary") or ""
            parts.append(f"<p>{html.escape(text)}</p>")
            body = operation.get("requestBody", {}).get("content", {})
            for kind, content in body.items():
                shown = json.dumps(resolved(content.get("schema", {})), indent=2)
                parts.append(f"<p>Request body ({html.escape(kind)}):</p><pre>{html.escape(shown)}</pre>")
            answers = operation.get("responses", {})
            if answers:
                items = "".join(
                    f"<li>{html.escape(str(code))}: {html.escape(str(answer.get('description', '')))}</li>"
                    for code, answer in answers.items()
                )
                parts.append(f"<p>Answers:</p><ul>{items}</ul>")
    style = "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}pre{background:#f6f6f6;padding:8px}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(str(info.get("title")))}'
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
