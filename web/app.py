"""``cxr web``: the web console and the HTTP API (FastAPI, Jinja2 pages, no CDN).

Pages: Try it (upload a radiograph), Worklist, Instance, Dashboard, Model, and the
OpenAPI page at ``/docs``. API under ``/api/v1``. It reads the audit DB through ``db``
(``db.queries``, ``db.lifecycle``) and writes no SQL of its own.

Security: everything but ``/api/v1/health`` and ``/static`` needs a login. The API takes
HTTP Basic (``admin`` or ``viewer``); the pages use a signed session cookie (SameSite
strict). State-changing requests (Retry) need the admin role and, with a session, a CSRF
token; a Basic-authenticated POST must not come from another origin (browsers send
``Origin`` on cross-site POSTs). Patient names are never shown: the audit DB holds none.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlparse

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from cxr import DISCLAIMER, __version__
from cxr.settings import Settings
from web.auth import Credentials, LoginLimiter, User
from web.health import HealthReport
from web.inference import UploadError, WebClassifier

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
RETRIABLE = ("failed", "delivery_failed")
STATES = (
    "received",
    "queued",
    "processing",
    "classified",
    "delivered",
    "delivered_with_warning",
    "delivery_failed",
    "failed",
    "ignored",
    "duplicate",
)
VERDICTS = ("COVID", "Normal", "Other")
_UID_RE = re.compile(r"[0-9.]{1,64}")  # a SOP Instance UID or an audit row id (fullmatch)
SMALL_BODY = 256 * 1024  # every request but the two uploads
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)

CSP_DOCS = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")


class LoginRequired(Exception):
    """Raised by page dependencies: redirect to the login page."""


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _as_utc(text: str | None, end: bool = False) -> datetime | None:
    if not text:
        return None
    from db.queries import parse_when

    try:
        return parse_when(text, end=end)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


# ---------------------------------------------------------------------- identity
def basic_user(request: Request) -> User | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        name, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise HTTPException(400, "malformed Authorization header") from None
    limiter: LoginLimiter = request.app.state.limiter
    client = _client(request)
    wait = limiter.retry_after(client, name)
    if wait is not None:
        raise HTTPException(
            429, "too many failed logins: try later", {"Retry-After": str(math.ceil(wait))}
        )
    user = request.app.state.credentials.check(name, password)
    if user is None:
        limiter.failed(client, name)
        raise HTTPException(
            401, "wrong user name or password", {"WWW-Authenticate": 'Basic realm="cxr"'}
        )
    limiter.succeeded(client, name)
    request.state.via = "basic"
    return user  # type: ignore[no-any-return]


def session_user(request: Request) -> User | None:
    """The session's user, while its password is unchanged and the session not ended."""
    data = request.session.get("user")
    if not isinstance(data, dict):
        return None
    creds: Credentials = request.app.state.credentials
    name = str(data.get("name"))
    fp = creds.fingerprint(name)
    if fp is None or data.get("fp") != fp or data.get("sid") in request.app.state.revoked:
        request.session.clear()
        return None
    request.state.via = "session"
    return User(name, str(data.get("role")))


_basic_scheme = HTTPBasic(auto_error=False, description="user admin (or viewer)")


def api_user(
    request: Request,
    _doc: Annotated[HTTPBasicCredentials | None, Depends(_basic_scheme)] = None,
) -> User:
    """HTTP Basic (checked by :func:`basic_user`; the scheme above is for the OpenAPI
    page's Authorize button) or the pages' session."""
    user = basic_user(request) or session_user(request)
    if user is None:
        raise HTTPException(401, "login required", {"WWW-Authenticate": 'Basic realm="cxr"'})
    return user


def page_user(request: Request) -> User:
    user = session_user(request)
    if user is None:
        raise LoginRequired()
    return user


def csrf_token(request: Request) -> str:
    tok = request.session.get("csrf")
    if not tok:
        tok = request.session["csrf"] = secrets.token_urlsafe(24)
    return str(tok)


def check_csrf(request: Request, token: str | None) -> None:
    """A session's POST carries its CSRF token; a Basic one must be same-origin."""
    if getattr(request.state, "via", None) == "basic":
        origin = request.headers.get("origin")
        if origin and urlparse(origin).netloc != request.url.netloc:
            raise HTTPException(403, "cross-origin request refused")
        return
    want = request.session.get("csrf")
    token = token or request.headers.get("x-csrf-token")
    if not want or not token or not secrets.compare_digest(str(want), str(token)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page")


def require_admin(user: User) -> None:
    if not user.is_admin:
        raise HTTPException(403, "this needs the admin role")


ApiUser = Annotated[User, Depends(api_user)]
PageUser = Annotated[User, Depends(page_user)]


def create_app(
    settings: Settings,
    *,
    credentials: Credentials | None = None,
    classifier_loader: Callable[[Settings], Any] | None = None,
    warm_up: bool = True,
) -> FastAPI:
    """The ASGI app. ``credentials`` default to the settings' (raises NoPasswordError)."""
    from db.session import init_db

    creds = credentials or Credentials.from_settings(settings)
    limiter = LoginLimiter(settings.web_login_max_failures, settings.web_login_window_seconds)
    classifier = WebClassifier(settings, classifier_loader)
    health = HealthReport(settings, model_state=lambda: (classifier.state, classifier.error))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(disclaimer=DISCLAIMER, version=__version__)
    init_db(settings.database_url)

    app = FastAPI(
        title="cxr-triage API",
        version=__version__,
        description=(
            f"Chest X-ray triage beside the PACS. **{DISCLAIMER}.** All endpoints except "
            "`/api/v1/health` need HTTP Basic (user `admin`, or `viewer` read-only)."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        max_body_size=SMALL_BODY,  # the two upload routes allow CXR_WEB_MAX_UPLOAD_BYTES
    )
    upload_body = settings.web_max_upload_bytes + 64 * 1024  # multipart overhead
    secret = (
        settings.web_secret_key.get_secret_value()
        if settings.web_secret_key
        else secrets.token_urlsafe(32)
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie="cxr_session",
        max_age=settings.web_session_max_age,
        same_site="strict",
        https_only=settings.web_tls_cert is not None,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.settings = settings
    app.state.credentials = creds
    app.state.limiter = limiter
    app.state.revoked = set()  # session ids ended by "Log out" (in this process)
    app.state.classifier = classifier
    app.state.health = health

    if warm_up:
        threading.Thread(target=classifier.warm_up, name="web-model", daemon=True).start()

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        # Swagger UI sets inline styles: only its page allows them
        csp = CSP_DOCS if request.url.path == "/docs" else CSP
        response.headers.setdefault("Content-Security-Policy", csp)
        if not request.url.path.startswith("/static/"):
            # shared ward PCs: nothing behind the login stays in a browser cache
            response.headers.setdefault("Cache-Control", "no-store")
        if settings.web_tls_cert is not None:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    @app.middleware("http")
    async def uploads_need_credentials(request: Request, call_next: Any) -> Response:
        """FastAPI parses an upload's body before the login is checked: refuse a POST to
        the upload routes that carries no credentials at all before reading it."""
        if request.method == "POST" and request.url.path in ("/try", "/api/v1/predict"):
            if "authorization" not in request.headers and "cxr_session" not in request.cookies:
                if request.url.path == "/try":
                    return RedirectResponse("/login?next=/try", status_code=303)
                return JSONResponse(
                    {"detail": "login required"}, 401, {"WWW-Authenticate": 'Basic realm="cxr"'}
                )
        response: Response = await call_next(request)
        return response

    def render(
        request: Request, name: str, user: User | None, status_code: int = 200, **ctx: Any
    ) -> Response:
        flash = request.session.pop("flash", None) if "flash" in request.session else None
        ctx.update(user=user, csrf=csrf_token(request), path=request.url.path, flash=flash)
        ctx.setdefault("keep_uploads", settings.web_keep_uploads)
        return templates.TemplateResponse(request, name, ctx, status_code=status_code)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(LoginRequired)
    async def _login_redirect(request: Request, _exc: LoginRequired) -> Response:
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": nxt}), status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        if request.url.path.startswith("/api/") or request.url.path == "/openapi.json":
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)
        user = session_user(request)
        resp = render(
            request,
            "error.html",
            user,
            status_code=exc.status_code,
            code=exc.status_code,
            message=str(exc.detail),
        )
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> Response:
        log.error("web: audit database unavailable: %s", type(exc.orig).__name__)
        detail = "the audit database is unavailable: try again shortly"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, 503, {"Retry-After": "10"})
        return render(request, "error.html", None, status_code=503, code=503, message=detail)

    # ------------------------------------------------------------------ login
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002
        return render(request, "login.html", None, next=_safe_next(next), error=None)

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        csrf_token_: Annotated[str, Form(alias="csrf_token")] = "",
        next: Annotated[str, Form()] = "/",  # noqa: A002
    ) -> Response:
        check_csrf(request, csrf_token_)
        client = _client(request)
        wait = limiter.retry_after(client, username)
        if wait is not None:
            return render(
                request,
                "login.html",
                None,
                status_code=429,
                next=_safe_next(next),
                error=f"Too many failed logins. Try again in {math.ceil(wait)} s.",
            )
        user = creds.check(username, password)
        if user is None:
            limiter.failed(client, username)
            return render(
                request,
                "login.html",
                None,
                status_code=401,
                next=_safe_next(next),
                error="Wrong user name or password.",
            )
        limiter.succeeded(client, username)
        request.session.clear()
        request.session["user"] = {
            "name": user.name,
            "role": user.role,
            "fp": creds.fingerprint(user.name),
            "sid": secrets.token_urlsafe(12),
        }
        request.session["csrf"] = secrets.token_urlsafe(24)
        log.info("web login: user %s from %s", user.name, client)
        return RedirectResponse(_safe_next(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(
        request: Request, csrf_token_: Annotated[str, Form(alias="csrf_token")] = ""
    ) -> Response:
        check_csrf(request, csrf_token_)
        data = request.session.get("user")
        if isinstance(data, dict) and data.get("sid"):
            revoked: set[str] = app.state.revoked
            if len(revoked) > 100_000:
                revoked.clear()  # bounded; the fingerprint still ends sessions on a change
            revoked.add(str(data["sid"]))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ------------------------------------------------------------------ pages
    @app.get("/", include_in_schema=False)
    def index(user: PageUser) -> Response:
        return RedirectResponse("/try", status_code=303)

    @app.get("/try", response_class=HTMLResponse, include_in_schema=False)
    def try_page(request: Request, user: PageUser) -> Response:
        return render(
            request,
            "try.html",
            user,
            result=None,
            error=None,
            model=classifier.info(),
            model_state=classifier.state,
            max_bytes=settings.web_max_upload_bytes,
        )

    @app.post(
        "/try", response_class=HTMLResponse, include_in_schema=False, max_body_size=upload_body
    )
    async def try_upload(
        request: Request,
        user: PageUser,
        file: Annotated[UploadFile | None, File()] = None,
        csrf_token_: Annotated[str, Form(alias="csrf_token")] = "",
    ) -> Response:
        check_csrf(request, csrf_token_)
        ctx: dict[str, Any] = {"max_bytes": settings.web_max_upload_bytes}
        try:
            data = await _read_upload(file, settings.web_max_upload_bytes)
            result = await _predict(classifier, data, file.filename if file else None)
        except UploadError as exc:
            resp = render(
                request,
                "try.html",
                user,
                status_code=exc.status,
                result=None,
                error=str(exc),
                model=classifier.info(),
                model_state=classifier.state,
                **ctx,
            )
            if exc.retry_after:
                resp.headers["Retry-After"] = str(exc.retry_after)
            return resp
        return render(
            request,
            "try.html",
            user,
            result=result,
            error=None,
            model=result.model,
            model_state=classifier.state,
            filename=file.filename if file else None,
            **ctx,
        )

    @app.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
    def worklist(
        request: Request,
        user: PageUser,
        since: str | None = None,
        until: str | None = None,
        state: Annotated[list[str] | None, Query()] = None,
        verdict: Annotated[list[str] | None, Query()] = None,
        calling_ae: str | None = None,
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
        partial: bool = False,
    ) -> Response:
        flt = _filter(since, until, state, verdict, calling_ae, PAGE_SIZE, (page - 1) * PAGE_SIZE)
        rows, total = _list(settings, flt)
        query = {
            k: v for k, v in (("since", since), ("until", until), ("calling_ae", calling_ae)) if v
        }
        base = [(k, v) for k, v in query.items()]
        base += [("state", s) for s in state or []] + [("verdict", v) for v in verdict or []]
        pages = max(1, math.ceil(total / PAGE_SIZE))
        ctx: dict[str, Any] = dict(
            rows=rows,
            total=total,
            page=page,
            pages=pages,
            states=STATES,
            verdicts=VERDICTS,
            sel_states=set(state or []),
            sel_verdicts=set(verdict or []),
            since=since or "",
            until=until or "",
            calling_ae=calling_ae or "",
            qs=lambda p: urlencode(base + [("page", p)]),
            refresh_url="/worklist?" + urlencode(base + [("page", page), ("partial", 1)]),
        )
        name = "worklist_rows.html" if partial else "worklist.html"
        return render(request, name, user, **ctx)

    @app.get("/instances/{uid}", response_class=HTMLResponse, include_in_schema=False)
    def instance_page(request: Request, uid: str, user: PageUser) -> Response:
        versions = _history(settings, uid)
        return render(
            request,
            "instance.html",
            user,
            uid=uid,
            versions=versions,
            retriable=RETRIABLE,
        )

    @app.get("/instances/{uid}/sc.png", include_in_schema=False)
    def sc_preview(uid: str, user: PageUser, version: int | None = None) -> Response:
        return Response(_sc_png(settings, uid, version), media_type="image/png")

    @app.post("/instances/{uid}/retry", include_in_schema=False)
    def retry_page(
        request: Request,
        uid: str,
        user: PageUser,
        csrf_token_: Annotated[str, Form(alias="csrf_token")] = "",
    ) -> Response:
        check_csrf(request, csrf_token_)
        require_admin(user)
        out = _retry(settings, uid, user)
        request.session["flash"] = str(out["message"])[:300]
        return RedirectResponse(f"/instances/{uid}", status_code=303)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(
        request: Request, user: PageUser, hours: Annotated[int, Query(ge=1, le=24 * 90)] = 24
    ) -> Response:
        data = _dashboard(settings, hours)
        status, checks = health.summary(echo=True)
        return render(
            request, "dashboard.html", user, hours=hours, status=status, checks=checks, **data
        )

    @app.get("/model", response_class=HTMLResponse, include_in_schema=False)
    def model_page(request: Request, user: PageUser) -> Response:
        from web.modelcard import render_card

        html, files = render_card(Path(settings.model_dir))
        return render(
            request,
            "model.html",
            user,
            card_html=html,
            files=files,
            model=classifier.info(),
            model_state=classifier.state,
        )

    @app.get("/model/files/{name:path}", include_in_schema=False)
    def model_file(name: str, user: PageUser) -> Response:
        from web.modelcard import model_file_bytes

        data, ctype = model_file_bytes(Path(settings.model_dir), name)
        return Response(data, media_type=ctype)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs(request: Request, user: PageUser) -> Response:
        return render(request, "docs.html", user)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(user: ApiUser) -> Response:
        return JSONResponse(app.openapi())

    # ------------------------------------------------------------------ API
    @app.get("/api/v1/health", tags=["health"], summary="Health of DB, broker, node, workers")
    def api_health() -> Response:
        """No login needed. 200 when the audit DB answers (status ``ok`` or ``degraded``),
        503 when it does not (``fail``). The node is checked by a TCP connection here (the
        dashboard sends a C-ECHO); the details stay behind the login."""
        status, checks = health.summary()
        body = {"status": status, "checks": {k: c.public() for k, c in checks.items()}}
        return JSONResponse(body, 503 if status == "fail" else 200)

    @app.post(
        "/api/v1/predict",
        tags=["predict"],
        summary="Classify one radiograph",
        max_body_size=upload_body,
    )
    async def api_predict(
        request: Request,
        user: ApiUser,
        file: Annotated[UploadFile | None, File(description="PNG, JPEG or DICOM")] = None,
        image: Annotated[bool, Query(description="also return the plain image as PNG")] = False,
    ) -> Response:
        """Multipart field ``file``. Returns ``label``, calibrated ``probabilities``
        (COVID, Normal, Other), ``model`` (name, version), the out-of-distribution flag and
        the Grad-CAM overlay as base64 PNG. Research use only, not for diagnostic use."""
        check_csrf(request, None)
        try:
            data = await _read_upload(file, settings.web_max_upload_bytes)
            result = await _predict(classifier, data, file.filename if file else None, image)
        except UploadError as exc:
            hdr = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return JSONResponse({"detail": str(exc)}, exc.status, hdr)
        return JSONResponse(result.as_json())

    @app.get("/api/v1/instances", tags=["audit"], summary="Worklist: recent instances")
    def api_instances(
        user: ApiUser,
        since: str | None = None,
        until: str | None = None,
        state: Annotated[list[str] | None, Query()] = None,
        verdict: Annotated[list[str] | None, Query()] = None,
        calling_ae: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> Response:
        """Newest first. ``since``/``until``: ``YYYY-MM-DD`` or ISO date-time (UTC)."""
        flt = _filter(since, until, state, verdict, calling_ae, limit, offset)
        rows, total = _list(settings, flt)
        return JSONResponse(
            {
                "total": total,
                "limit": limit,
                "offset": offset,
                "items": [_public_row(r.as_dict(), settings) for r in rows],
            }
        )

    @app.get(
        "/api/v1/instances/{sop_instance_uid}", tags=["audit"], summary="One instance's history"
    )
    def api_instance(sop_instance_uid: str, user: ApiUser) -> Response:
        versions = _history(settings, sop_instance_uid)
        out = []
        for v in versions:
            d = v.as_dict()
            d["instance"] = _public_row(d["instance"], settings)
            out.append(d)
        return JSONResponse({"versions": out})

    @app.post("/api/v1/instances/{sop_instance_uid}/retry", tags=["audit"], summary="Retry (admin)")
    def api_retry(request: Request, sop_instance_uid: str, user: ApiUser) -> Response:
        """``failed`` -> classify again, ``delivery_failed`` -> deliver again. 409 when the
        instance is not in a retriable state."""
        check_csrf(request, None)
        require_admin(user)
        out = _retry(settings, sop_instance_uid, user)
        return JSONResponse(out, 200 if out["reset"] else 409)

    @app.get("/api/v1/stats", tags=["audit"], summary="Counts and latency (cxr audit stats)")
    def api_stats(
        user: ApiUser,
        since: str | None = None,
        until: str | None = None,
        calling_ae: str | None = None,
    ) -> Response:
        from db.queries import compute_stats
        from db.session import session_scope

        flt = _filter(since, until, None, None, calling_ae, None, 0)
        with session_scope(settings.database_url) as s:
            stats = compute_stats(s, flt)
        from db.lifecycle import queue_depth

        body = stats.as_dict()
        try:
            body["queue_depth"] = queue_depth(settings)
        except Exception as exc:  # the depth is a nicety: report it missing, do not fail
            log.warning("web: queue depth unavailable: %s", type(exc).__name__)
            body["queue_depth"] = None
        return JSONResponse(body)

    app.openapi_url = "/openapi.json"  # for the docs page; the route above needs a login
    return app


# ---------------------------------------------------------------------- helpers
def _safe_next(target: str) -> str:
    """Only local paths after login (no open redirect)."""
    p = urlparse(target or "/")
    if p.scheme or p.netloc or not (p.path or "/").startswith("/") or target.startswith("//"):
        return "/"
    return target or "/"


async def _read_upload(file: UploadFile | None, limit: int) -> bytes:
    if file is None:
        raise UploadError("no file uploaded (multipart field 'file')", 400)
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise UploadError(f"file larger than {limit} bytes (CXR_WEB_MAX_UPLOAD_BYTES)", 413)
    if not data:
        raise UploadError("the file is empty", 400)
    return data


async def _predict(
    classifier: WebClassifier, data: bytes, filename: str | None, with_image: bool = True
) -> Any:
    from starlette.concurrency import run_in_threadpool

    if classifier.state == "error":
        raise UploadError(f"the model could not be loaded: {classifier.error}", 503)
    return await run_in_threadpool(classifier.predict_bytes, data, filename, with_image)


def _filter(
    since: str | None,
    until: str | None,
    states: list[str] | None,
    verdicts: list[str] | None,
    calling_ae: str | None,
    limit: int | None,
    offset: int,
) -> Any:
    from db.queries import InstanceFilter

    return InstanceFilter(
        since=_as_utc(since),
        until=_as_utc(until, end=True),
        states=[s for s in states or [] if s],
        verdicts=[v for v in verdicts or [] if v],
        calling_aes=[calling_ae.strip()] if calling_ae and calling_ae.strip() else [],
        limit=limit,
        offset=offset,
    )


def _list(settings: Settings, flt: Any) -> tuple[list[Any], int]:
    from db.queries import count_instances, list_instances
    from db.session import session_scope

    with session_scope(settings.database_url) as s:
        return list_instances(s, flt), count_instances(s, flt)


def _public_row(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """An instance row as the API shows it: a PatientID stored in clear
    (CXR_PATIENT_ID_STORAGE=plain) is never shown; a salted hash is."""
    if settings.patient_id_storage != "hash":
        row = {k: v for k, v in row.items() if k != "patient_id_hash"}
    return row


def _history(settings: Settings, uid: str) -> list[Any]:
    from db.queries import instance_history
    from db.session import session_scope

    if not _UID_RE.fullmatch(uid):
        raise HTTPException(422, "not a SOP Instance UID")
    with session_scope(settings.database_url) as s:
        versions = instance_history(s, uid)
    if not versions:
        raise HTTPException(404, f"no instance with SOP Instance UID {uid}")
    return versions


def _sc_png(settings: Settings, uid: str, version: int | None) -> bytes:
    """The Secondary Capture that was sent for this instance, rendered from the stored
    object in the spool (not rebuilt)."""
    import cv2

    from cxr.storage import Spool
    from ml.preprocess import dicom_to_display

    versions = _history(settings, uid)
    chosen = (
        versions[-1]
        if version is None
        else next((v for v in versions if v.instance.version == version), None)
    )
    if chosen is None or not chosen.inferences:
        raise HTTPException(404, "no result was built for this instance")
    sc_uid = chosen.inferences[-1].get("sc_sop_instance_uid")
    spool = Spool(settings.spool_dir)
    path = spool.result_path(str(sc_uid)) if sc_uid else None
    if path is None or not path.is_file():
        raise HTTPException(404, "the Secondary Capture is no longer in the spool (retention)")
    try:
        ds = spool.read_dataset(path)
        arr = ds.pixel_array
        if arr.ndim == 3 and arr.shape[-1] == 3:
            img = cv2.cvtColor(arr.astype("uint8"), cv2.COLOR_RGB2BGR)
        else:
            img = dicom_to_display(ds)
    except Exception as exc:  # a damaged stored object: say so, do not answer 500
        log.warning("web: the stored SC of %s is unreadable: %s", uid, type(exc).__name__)
        raise HTTPException(422, "the stored Secondary Capture cannot be read") from None
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise HTTPException(500, "PNG encoding failed")
    return buf.tobytes()


def _retry(settings: Settings, uid: str, user: User) -> dict[str, Any]:
    from db.lifecycle import retry

    # the version shown (the latest): an older, superseded version is never re-sent
    latest = _history(settings, uid)[-1].instance
    out = retry(settings, instance_id=latest.id, who=f"web:{user.name}")
    if not out.actions:
        note = "; ".join(out.notes) or "nothing to retry"
        if any("no instance with" in n for n in out.notes):
            raise HTTPException(404, note)
        return {"reset": [], "message": note}
    a = out.actions[0]
    queued = a.instance_id in out.sent
    msg = f"{a.from_state} -> {a.to_state}: {a.task} " + (
        "queued" if queued else "reset (broker unavailable: the sweep will queue it)"
    )
    log.info("web retry by %s: instance %d %s", user.name, a.instance_id, msg)
    return {
        "reset": [
            {"instance_id": x.instance_id, "from": x.from_state, "to": x.to_state, "task": x.task}
            for x in out.actions
        ],
        "queued": sorted(out.sent),
        "message": msg,
    }


def _dashboard(settings: Settings, hours: int) -> dict[str, Any]:
    from db.lifecycle import queue_depth
    from db.queries import InstanceFilter, compute_stats, counts_over_time
    from db.session import session_scope

    until = datetime.now(UTC)
    since = until - timedelta(hours=hours)
    with session_scope(settings.database_url) as s:
        stats = compute_stats(s, InstanceFilter(since=since, until=until))
        buckets = counts_over_time(s, since, until, buckets=24)
    try:
        depth: int | None = queue_depth(settings)
    except Exception:
        depth = None
    from web.charts import stacked_bars

    verdict_chart = stacked_bars(
        [b.start for b in buckets],
        [b.per_verdict for b in buckets],
        ["COVID", "Normal", "Other", "-"],
    )
    state_chart = stacked_bars(
        [b.start for b in buckets], [b.per_state for b in buckets], list(STATES)
    )
    return {
        "stats": stats,
        "queue_depth": depth,
        "verdict_chart": verdict_chart,
        "state_chart": state_chart,
        "since": since,
        "until": until,
    }
