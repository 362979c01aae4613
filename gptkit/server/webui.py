"""The chat page: plain HTML, CSS and JavaScript files shipped in gptkit/server/web/ (package
data; no build step, nothing fetched from the internet). `/` and `/chat` serve the page,
`/static/...` its files; they load without an API key (PAGE_PATHS), and the page asks for the
key itself and sends it to the API routes. The page's responses carry a Content-Security-Policy
that allows only this server's own files and API (no inline script, no other origin) and may
not be framed by another site (clickjacking), with X-Frame-Options for older browsers."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).parent / "web"
PAGE_PATHS = {"/", "/chat", *(f"/static/{f.name}" for f in WEB.iterdir() if f.is_file())}


SECURITY_HEADERS = [(k.encode(), v.encode()) for k, v in {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}.items()]


class PageHeaders:
    """ASGI middleware: SECURITY_HEADERS on the page's own paths (the API's JSON needs none)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in PAGE_PATHS:
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_page(app: FastAPI) -> None:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    @router.get("/chat")
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(PageHeaders)
