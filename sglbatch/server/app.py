"""The FastAPI application: routes, API-key check, OpenAI-style errors."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import Response

from sglbatch.server import batches, files, native, openai_api
from sglbatch.server.errors import error_response, install_error_handlers
from sglbatch.server.state import ServerState

_OPEN_ROUTES = {"/health"}  # load balancers probe it without credentials


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="sglbatch", summary="SGLang's native API and the OpenAI API",
                  lifespan=batches.lifespan)  # starts/stops the BatchRunner
    app.state.sglbatch = state
    install_error_handlers(app)

    if state.args.api_key:
        expected = f"Bearer {state.args.api_key}".encode()

        @app.middleware("http")
        async def check_api_key(request: Request, call_next) -> Response:
            if request.url.path not in _OPEN_ROUTES:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return error_response(401, "missing or wrong API key: send "
                                               "`Authorization: Bearer <key>`",
                                          code="invalid_api_key")
            return await call_next(request)

    app.include_router(native.build_router(state))
    app.include_router(openai_api.build_router(state))
    app.include_router(files.build_router(state))
    app.include_router(batches.build_router(state))
    return app
