"""The HTTP API's ASGI app: the OpenAI routes, `/metrics`, the dashboard, and the swarm token in front.

With a swarm token, every path needs it — `/` and `/metrics` too — as `Authorization: Bearer TOKEN` (what
OpenAI clients send as their API key) or the `tsotsa_key` cookie (percent-encoded) the dashboard's page sets
once the user typed the key (a browser cannot add headers to a page load or an EventSource). Comparisons are constant
time. The check is plain ASGI middleware, so streamed responses pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response

from tsotsa.api.errors import ApiError, api_error_handler, error_response, validation_error_handler

KEY_COOKIE = "tsotsa_key"


def create_app(routers: list[APIRouter], *, token: str | None = None, metrics: Callable[[], bytes] | None = None,
               login_page: Callable[[], str] | None = None) -> FastAPI:
    """`routers`: the OpenAI routes, the dashboard's; `metrics`: the Prometheus exposition of this process;
    `login_page`: the HTML a browser gets for a page without the key (it asks for the key, then reloads)."""
    app = FastAPI(title="tsotsa", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    for router in routers:
        app.include_router(router)
    if metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST

        @app.get("/metrics")
        async def metrics_endpoint() -> Response:
            return Response(metrics(), media_type=CONTENT_TYPE_LATEST)

    if token:
        return TokenCheck(app, token, login_page)
    return app


class TokenCheck:
    """ASGI middleware: refuses every HTTP request without the swarm token with OpenAI's 401."""

    def __init__(self, app, token: str, login_page: Callable[[], str] | None) -> None:
        self.app, self.token, self.login_page = app, token.encode(), login_page

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self._admitted(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        wants_page = scope["method"] == "GET" and b"text/html" in headers.get(b"accept", b"")
        if wants_page and self.login_page is not None:
            response = HTMLResponse(self.login_page(), status_code=401)
        else:
            given = b"authorization" in headers
            response = error_response(401, "Incorrect API key provided: give the swarm token as the API key "
                                           "(Authorization: Bearer TOKEN)" if given else
                                      "You didn't provide an API key: give the swarm token as the API key "
                                      "(Authorization: Bearer TOKEN)", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _admitted(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer " and hmac.compare_digest(authorization[7:].strip(), self.token):
            return True
        cookie = headers.get(b"cookie")
        if cookie:
            jar = SimpleCookie()
            try:
                jar.load(cookie.decode("latin-1"))
            except Exception:  # a malformed cookie header is only not a key
                return False
            if KEY_COOKIE in jar and hmac.compare_digest(unquote(jar[KEY_COOKIE].value).encode(), self.token):
                return True
        return False
