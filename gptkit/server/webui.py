"""The chat page: plain HTML, CSS and JavaScript files shipped in gptkit/server/web/ (package
data; no build step, nothing fetched from the internet). `/` and `/chat` serve the page,
`/static/...` its files; they load without an API key (PAGE_PATHS), and the page asks for the
key itself and sends it to the API routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).parent / "web"
PAGE_PATHS = {"/", "/chat", *(f"/static/{f.name}" for f in WEB.iterdir() if f.is_file())}


def mount_page(app: FastAPI) -> None:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    @router.get("/chat")
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
