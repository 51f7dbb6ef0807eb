"""docker-compose.yml, Dockerfile and docker/: what can be checked without a Docker engine."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from apps.cli import SUBCOMMANDS, build_parser
from cxr.settings import ENV_PREFIX, Settings
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
OUR_IMAGE_SERVICES = {"migrate", "node", "worker", "web"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def test_required_services(services: dict[str, Any]) -> None:
    assert {"redis", "postgres", "node", "worker", "web", "flower", "orthanc"} <= services.keys()


def test_every_cxr_variable_is_a_real_setting(services: dict[str, Any]) -> None:
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    seen = 0
    for name, svc in services.items():
        for var in _env(svc):
            if var.startswith(ENV_PREFIX):
                seen += 1
                assert var in known, f"service {name}: {var} is not a setting of cxr.settings"
    assert seen > 10


def test_compose_settings_validate(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node/worker/web environment is accepted by the Settings validators."""
    for name in ("node", "worker", "web"):
        env = _env(services[name])
        for k in list(__import__("os").environ):
            if k.startswith(ENV_PREFIX):
                monkeypatch.delenv(k)
        for k, v in env.items():
            # as docker compose interpolates: ${VAR:-default} -> default; ${VAR:?error}
            # (a required secret) -> a value the operator would put in .env
            v = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v)
            monkeypatch.setenv(k, re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "s3cret-from-env", v))
        s = Settings(_env_file=None)  # type: ignore[call-arg]
        assert s.broker_url.startswith("redis://redis:")
        assert s.database_url.startswith("postgresql+psycopg://") and "@postgres:" in s.database_url
        assert [str(d) for d in s.destinations] == ["ORTHANC@orthanc:4242"]
        assert s.metrics_host == "0.0.0.0"


def test_commands_are_real_subcommands(services: dict[str, Any]) -> None:
    for name in OUR_IMAGE_SERVICES:
        cmd = _command(services[name])
        assert cmd[0] == "cxr", (name, cmd)
        assert cmd[1] in SUBCOMMANDS, (name, cmd)
        # the arguments parse (e.g. `cxr db upgrade`)
        args = build_parser(only=cmd[1]).parse_args(cmd[1:])
        assert callable(args.func)
    assert _command(services["node"])[:2] == ["cxr", "node"]
    assert _command(services["worker"])[:2] == ["cxr", "worker"]
    assert _command(services["web"])[:2] == ["cxr", "web"]
    assert "flower" in _command(services["flower"])


def test_our_images_build_from_the_dockerfile(services: dict[str, Any]) -> None:
    for name in OUR_IMAGE_SERVICES:
        build = services[name]["build"]
        ctx = REPO / build["context"]
        assert (ctx / build.get("dockerfile", "Dockerfile")).is_file()
    for name in ("redis", "postgres", "flower", "orthanc"):
        assert re.match(r"^[a-z0-9./-]+:[\w.-]+$", services[name]["image"]), name


def test_dockerfile_multistage_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\w+))?", text, re.M)
    assert len(stages) >= 2
    assert "COPY --from=build" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK", text, re.M)
    # every path the Dockerfile copies from the context exists
    for src in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), part
    ignored = (REPO / ".dockerignore").read_text().split()
    packages = ("apps", "cxr", "db", "dicom_node", "worker", "ml", "web")
    for needed in (*packages, "pyproject.toml", "README.md"):
        assert needed not in ignored


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    for name, svc in services.items():
        assert "container_name" not in svc, name


def test_health_checks_everywhere(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no health check"


def test_volumes_named_and_bind_mounts_exist(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    named = set(compose.get("volumes") or {})
    assert {"spool", "postgres-data", "redis-data"} <= named
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            src = (vol if isinstance(vol, str) else vol["source"]).split(":")[0]
            if src.startswith((".", "/")):
                assert (REPO / src).exists(), f"{name}: {src} missing"
            else:
                assert src in named, f"{name}: volume {src} is not declared"
    # node and workers share the spool
    spool = "/var/lib/cxr/spool"
    for name in ("node", "worker"):
        assert f"spool:{spool}" in services[name]["volumes"]
        assert _env(services[name])["CXR_SPOOL_DIR"] == spool


def test_orthanc_config_routes_to_the_node(services: dict[str, Any]) -> None:
    import json

    cfg = json.loads((REPO / "docker" / "orthanc.json").read_text())
    node_env = _env(services["node"])
    aet, host, port = (
        cfg["DicomModalities"]["cxr"]["AET"],
        cfg["DicomModalities"]["cxr"]["Host"],
        cfg["DicomModalities"]["cxr"]["Port"],
    )
    assert aet == node_env["CXR_AE_TITLE"]
    assert host == "node" and str(port) == node_env["CXR_DICOM_PORT"]
    lua_in_container = cfg["LuaScripts"][0]
    mounts = {
        v.split(":")[1]: v.split(":")[0]
        for v in services["orthanc"]["volumes"]
        if v.startswith(".")
    }
    assert lua_in_container in mounts
    assert (REPO / mounts[lua_in_container]).is_file()
    # results go back to the Orthanc AE on its DICOM port
    assert f"{cfg['DicomAet']}@orthanc:{cfg['DicomPort']}" == node_env["CXR_DESTINATIONS"]


def test_depends_on_services_exist(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services, f"{name} depends on unknown {dep}"


def test_repository_paths_in_compose_exist() -> None:
    text = COMPOSE.read_text()
    for rel in re.findall(r"\./(docker/[\w.-]+|Dockerfile)", text):
        assert (REPO / rel).exists(), rel
    assert Path(REPO / "docker" / "cxr-route.lua").is_file()


def test_secrets_have_no_defaults() -> None:
    """Passwords, the PatientID salt and Flower's login are required (${VAR:?...}): a
    deployment that forgot its .env must not come up with a published default."""
    text = COMPOSE.read_text()
    for var in (
        "POSTGRES_PASSWORD",
        "CXR_PATIENT_ID_SALT",
        "FLOWER_BASIC_AUTH",
        "CXR_WEB_ADMIN_PASSWORD",
        "CXR_WEB_SECRET_KEY",
    ):
        uses = re.findall(r"\$\{" + var + r"(:?[-?])?[^}]*\}", text)
        assert uses, f"{var} is not used"
        assert all(op == ":?" for op in uses), f"{var} must be ${{{var}:?...}}, found {uses}"


def test_web_service_serves_the_published_port_and_checks_health(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The web container listens on 0.0.0.0:8080 (published), has a password (no default),
    and its health check asks the endpoint that needs no login."""
    web = services["web"]
    SECRET = "a-secret-from-env-as-openssl-rand-makes-it"  # noqa: N806 (openssl rand -hex 32)
    env = _env(web)
    assert env["CXR_WEB_HOST"] == "0.0.0.0"
    assert f"{env['CXR_WEB_PORT']}:{env['CXR_WEB_PORT']}" in web["ports"]
    assert "/api/v1/health" in " ".join(web["healthcheck"]["test"])
    assert f":{env['CXR_WEB_PORT']}/api/v1/health" in " ".join(web["healthcheck"]["test"])
    for k in list(__import__("os").environ):
        if k.startswith(ENV_PREFIX):
            monkeypatch.delenv(k)
    for k, v in env.items():
        v = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v)
        monkeypatch.setenv(k, re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", SECRET, v))
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    from web.auth import Credentials

    assert Credentials.from_settings(s).check("admin", SECRET) is not None
    # the previews read the spool the node and workers write
    assert any(v.startswith("spool:/var/lib/cxr/spool") for v in web["volumes"])
