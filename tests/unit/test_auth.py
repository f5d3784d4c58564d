"""API keys: config rules, loading, hashing, constant-time lookup, 401/403, admin, the middleware."""

from __future__ import annotations

import hmac
import json
import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serve_app.errors import AuthenticationError, PermissionDeniedError
from serve_app.router import api_keys
from serve_app.router import auth as auth_mod
from serve_app.router.api_keys import KeyListError, hash_key, parse_key_list
from serve_app.router.auth import ANONYMOUS, Authenticator, principal_of
from serve_app.router.config import AuthConfig
from serve_app.router.middleware import AuthMiddleware

ACME_KEY = "sk-acme-0123456789abcdefghij"
GLOBEX_KEY = "sk-globex-0123456789abcdefghij"
OPS_KEY = "sk-ops-0123456789abcdefghijklmn"
KEYS = [
    {"tenant": "acme", "key_sha256": hash_key(ACME_KEY), "adapters": ["acme-*", "tenant-1"]},
    {"tenant": "globex", "key": GLOBEX_KEY, "adapters": ["globex-chat"], "base_model": False},
    {"tenant": "ops", "key_sha256": hash_key(OPS_KEY), "admin": True},
]


def bearer(key: str) -> str:
    return f"Bearer {key}"


@pytest.fixture
def auth(tmp_path) -> Authenticator:
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"keys": KEYS}))
    return Authenticator.from_config(AuthConfig(enabled=True, keys_file=str(f), keys_env=None))


# ---- config --------------------------------------------------------------------------------


def test_config_rules():
    with pytest.raises(ValidationError, match="key source"):
        AuthConfig(enabled=True, keys_env=None)
    with pytest.raises(ValidationError, match="extra"):
        AuthConfig.model_validate({"enabled": True, "keyfile": "x"})
    with pytest.raises(ValidationError, match="environment variable name"):
        AuthConfig(keys_env="NOT A NAME")
    assert AuthConfig().enabled is False and AuthConfig().keys_env == "SERVE_APP_API_KEYS"
    for name, f in AuthConfig.model_fields.items():
        assert f.description, name


def test_key_entry_rules_and_errors_never_echo_the_key():
    secret = "sk-short"
    with pytest.raises(KeyListError) as e:
        parse_key_list(json.dumps([{"tenant": "a", "key": secret}]), "test")
    assert "shorter" in str(e.value) and secret not in str(e.value)
    bad_type = "sk-this-is-a-long-secret-value-xyz"
    with pytest.raises(KeyListError) as e:
        parse_key_list(json.dumps([{"tenant": "a", "key_sha256": bad_type}]), "test")
    assert bad_type not in str(e.value) and "entry 0" in str(e.value)
    with pytest.raises(KeyListError, match="exactly one"):
        parse_key_list(json.dumps([{"tenant": "a"}]), "test")
    with pytest.raises(KeyListError, match="exactly one"):
        parse_key_list(json.dumps([{"tenant": "a", "key": ACME_KEY, "key_sha256": hash_key(ACME_KEY)}]), "t")
    with pytest.raises(KeyListError, match="patterns"):
        parse_key_list(json.dumps([{"tenant": "a", "key": ACME_KEY, "adapters": ["a*b"]}]), "t")
    with pytest.raises(KeyListError, match="extra|Extra"):
        parse_key_list(json.dumps([{"tenant": "a", "key": ACME_KEY, "adapterz": []}]), "t")
    # Garbage that happens to be a key: the message must not contain it.
    with pytest.raises(KeyListError) as e:
        parse_key_list(ACME_KEY, "env")
    assert ACME_KEY not in str(e.value)
    with pytest.raises(KeyListError, match="twice"):
        Authenticator(parse_key_list(json.dumps([KEYS[0], {**KEYS[0], "tenant": "other"}]), "t"))
    with pytest.raises(KeyListError, match="empty"):
        Authenticator([], enabled=True)


def test_yaml_file_and_env_sources_are_merged(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("keys:\n  - tenant: acme\n    key_sha256: %s\n    adapters: ['acme-*']\n" % hash_key(ACME_KEY))
    env = {"MY_KEYS": json.dumps([KEYS[1]])}
    a = Authenticator.from_config(AuthConfig(enabled=True, keys_file=str(f), keys_env="MY_KEYS"), environ=env)
    assert a.authenticate(bearer(ACME_KEY)).tenant == "acme"
    assert a.authenticate(bearer(GLOBEX_KEY)).tenant == "globex"
    assert a.tenant_count() == 2
    with pytest.raises(KeyListError, match="cannot be read"):
        Authenticator.from_config(AuthConfig(enabled=True, keys_file=str(tmp_path / "missing"), keys_env=None))


def test_only_digests_are_kept(auth):
    # No attribute anywhere in the authenticator holds a plaintext key.
    blob = repr(vars(auth)) + repr(auth._keys)
    for key in (ACME_KEY, GLOBEX_KEY, OPS_KEY):
        assert key not in blob
        assert key.encode() not in b"".join(k.digest for k in auth._keys)


# ---- authentication and authorization ---------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "bearer wrong-key-0123456789xyz",
                                    ACME_KEY, "Bearer " + ACME_KEY + "x", "Token " + ACME_KEY])
def test_missing_malformed_or_unknown_key_is_401(auth, header):
    with pytest.raises(AuthenticationError) as e:
        auth.authenticate(header)
    assert e.value.status_code == 401
    assert ACME_KEY not in e.value.message


def test_scheme_is_case_insensitive_and_whitespace_tolerated(auth):
    assert auth.authenticate(f"bearer   {ACME_KEY}  ").tenant == "acme"


def test_every_stored_key_is_compared_in_constant_time(auth, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", counting)
    for key in (ACME_KEY, OPS_KEY, "sk-unknown-key-0123456789abcdef"):
        calls.clear()
        try:
            auth.authenticate(bearer(key))
        except AuthenticationError:
            pass
        assert len(calls) == 3, "every stored key must be compared, matched or not"


def test_other_tenants_adapter_is_403_whether_it_exists_or_not(auth):
    p = auth.authenticate(bearer(ACME_KEY))
    messages = set()
    for other in ("globex-chat", "no-such-adapter", "tenant-2"):
        with pytest.raises(PermissionDeniedError) as e:
            auth.authorize(p, other)
        assert e.value.status_code == 403 and e.value.code == "model_not_permitted"
        messages.add(e.value.message.replace(other, "<id>"))
    assert len(messages) == 1, messages
    auth.authorize(p, "acme-support")
    auth.authorize(p, "tenant-1")
    auth.authorize(p, None)  # base model allowed by default
    g = auth.authenticate(bearer(GLOBEX_KEY))
    with pytest.raises(PermissionDeniedError, match="base model"):
        auth.authorize(g, None)
    assert auth.check(bearer(GLOBEX_KEY), "globex-chat").tenant == "globex"
    with pytest.raises(PermissionDeniedError):
        auth.authorize(g, "globex-chat-2")  # exact IDs do not match as prefixes


def test_admin_routes_need_an_admin_key(auth):
    with pytest.raises(PermissionDeniedError, match="admin"):
        auth.check(bearer(ACME_KEY), admin=True)
    assert auth.check(bearer(OPS_KEY), admin=True).admin
    # An admin key is not a tenant key: it has no adapters unless listed.
    with pytest.raises(PermissionDeniedError):
        auth.authorize(auth.authenticate(bearer(OPS_KEY)), "acme-x")


def test_disabled_auth_warns_and_lets_everyone_in(caplog):
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        a = Authenticator.from_config(AuthConfig(enabled=False))
    assert any("auth is OFF" in r.getMessage() for r in caplog.records)
    p = a.check(None, "anything", admin=True)
    assert p is ANONYMOUS and p.tenant is None


def test_keys_never_logged(tmp_path, caplog):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps(KEYS))
    with caplog.at_level(logging.DEBUG):
        a = Authenticator.from_config(AuthConfig(enabled=True, keys_file=str(f), keys_env=None))
        for h in (bearer(ACME_KEY), bearer("sk-wrong-0123456789abcdefgh")):
            try:
                a.check(h, "globex-chat")
            except Exception as e:  # noqa: BLE001
                logging.getLogger("ray.serve").warning("refused: %s", e)
    text = caplog.text
    for key in (ACME_KEY, GLOBEX_KEY, OPS_KEY, "sk-wrong-0123456789abcdefgh"):
        assert key not in text


def test_cli_new_and_hash(capsys, monkeypatch):
    import io

    assert api_keys._main(["new", "--tenant", "acme", "--adapters", "acme-*"]) == 0
    out = capsys.readouterr()
    entry = json.loads(out.out)
    key = out.err.strip().splitlines()[-1].lstrip("# ").strip()
    assert hash_key(key) == entry["key_sha256"] and entry["adapters"] == ["acme-*"]
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert api_keys._main(["hash"]) == 0
    assert capsys.readouterr().out.strip() == entry["key_sha256"]


# ---- the ASGI middleware -------------------------------------------------------------------------


def make_app(authenticator, root_path: str = "") -> TestClient:
    app = FastAPI()
    holder = {"auth": authenticator}
    app.add_middleware(AuthMiddleware, authenticator=lambda: holder["auth"])

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        p = principal_of(request)
        return {"tenant": p.tenant, "admin": p.admin}

    @app.get("/admin/state")
    async def admin(request: Request):
        return {"tenant": principal_of(request).tenant}

    client = TestClient(app, root_path=root_path)
    client.holder = holder
    return client


def test_middleware_401_403_and_public_paths(auth):
    c = make_app(auth)
    assert c.get("/health").status_code == 200
    assert c.get("/openapi.json").status_code == 200
    r = c.post("/v1/completions", json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    r = c.post("/v1/completions", json={}, headers={"Authorization": "Bearer nope-0123456789abcdefghij"})
    assert r.status_code == 401 and "nope" not in r.text
    r = c.post("/v1/completions", json={}, headers={"Authorization": bearer(ACME_KEY)})
    assert r.status_code == 200 and r.json() == {"tenant": "acme", "admin": False}
    r = c.get("/admin/state", headers={"Authorization": bearer(ACME_KEY)})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = c.get("/admin/state", headers={"Authorization": bearer(OPS_KEY)})
    assert r.status_code == 200 and r.json() == {"tenant": "ops"}
    # Unknown routes need a key too (nothing to learn about the app without one).
    assert c.get("/nope").status_code == 401


def test_middleware_fails_closed_until_configured():
    c = make_app(None)
    r = c.post("/v1/completions", json={})
    assert r.status_code == 503 and r.json()["error"]["code"]
    assert c.get("/health").status_code == 200


def test_middleware_under_a_route_prefix(auth):
    c = make_app(auth, root_path="/tenant-api")
    assert c.get("/health").status_code == 200
    assert c.get("/admin/state", headers={"Authorization": bearer(ACME_KEY)}).status_code == 403


def test_middleware_with_auth_off_is_anonymous_admin():
    c = make_app(Authenticator(enabled=False))
    assert c.post("/v1/completions", json={}).json() == {"tenant": None, "admin": True}
    assert c.get("/admin/state").status_code == 200


# ---- fail closed, and reload without a restart -----------------------------------------------------


def test_principal_of_fails_closed_when_no_principal_was_set(auth):
    from serve_app.router.auth import ANONYMOUS_TENANT

    # The middleware did not run (a route outside it, a test app, a mis-ordered stack): never admin.
    with pytest.raises(AuthenticationError) as ei:
        principal_of({"type": "http"})
    assert ei.value.status_code == 401
    with pytest.raises(AuthenticationError):
        principal_of({"type": "http"}, auth)
    p = principal_of({"type": "http"}, Authenticator(enabled=False))
    assert p is ANONYMOUS_TENANT and not p.admin and p.may_use("any-adapter") and p.may_use(None)
    # What the middleware set is what the route sees.
    assert principal_of({"serve_app.principal": ANONYMOUS}) is ANONYMOUS


def test_a_route_without_the_middleware_is_401_not_admin():
    app = FastAPI()

    @app.get("/admin/state")
    async def admin(request: Request):
        try:
            return {"admin": principal_of(request).admin}
        except AuthenticationError as e:
            return {"status": e.status_code}

    assert TestClient(app).get("/admin/state").json() == {"status": 401}


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _write_keys(path, entries):
    import os

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)  # how a secret volume / an editor swaps the file: a new inode


def test_keys_file_reloads_without_a_restart(tmp_path, caplog):
    f = tmp_path / "keys.json"
    _write_keys(f, KEYS[:1])
    clock = _Clock()
    a = Authenticator.from_config(AuthConfig(enabled=True, keys_file=str(f), keys_env=None, keys_reload_s=5),
                                  clock=clock)
    assert a.authenticate(bearer(ACME_KEY)).tenant == "acme"
    with pytest.raises(AuthenticationError):
        a.authenticate(bearer(OPS_KEY))
    # Rotate: ops added, acme revoked. Not seen before the interval, seen after it.
    _write_keys(f, KEYS[2:])
    clock.t += 4
    assert a.authenticate(bearer(ACME_KEY)).tenant == "acme"
    clock.t += 2
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert a.authenticate(bearer(OPS_KEY)).tenant == "ops"
    with pytest.raises(AuthenticationError):
        a.authenticate(bearer(ACME_KEY))
    assert any("reloaded" in r.getMessage() for r in caplog.records)
    assert OPS_KEY not in caplog.text and hash_key(OPS_KEY) not in caplog.text


@pytest.mark.parametrize("broken", ["{not json or yaml: [", json.dumps({"keys": []}),
                                    json.dumps({"keys": [{"tenant": "x", "key": "tiny-secret-9"}]}), None])
def test_a_broken_keys_file_keeps_the_last_good_keys_and_logs(tmp_path, caplog, broken):
    f = tmp_path / "keys.json"
    _write_keys(f, KEYS)
    clock = _Clock()
    a = Authenticator.from_config(AuthConfig(enabled=True, keys_file=str(f), keys_env=None, keys_reload_s=1),
                                  clock=clock)
    if broken is None:
        f.unlink()
    else:
        f.write_text(broken)
    clock.t += 2
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        assert a.authenticate(bearer(OPS_KEY)).tenant == "ops"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "NOT reloaded" in errors[0] and "last good keys" in errors[0]
    assert "tiny-secret-9" not in caplog.text
    # Reported once, not on every interval; a fixed file is picked up again.
    clock.t += 2
    a.authenticate(bearer(OPS_KEY))
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    _write_keys(f, KEYS[:1])
    clock.t += 2
    with pytest.raises(AuthenticationError):
        a.authenticate(bearer(OPS_KEY))


def test_reload_interval_zero_reads_the_file_once(tmp_path):
    f = tmp_path / "keys.json"
    _write_keys(f, KEYS[:1])
    clock = _Clock()
    a = Authenticator.from_config(AuthConfig(enabled=True, keys_file=str(f), keys_env=None, keys_reload_s=0),
                                  clock=clock)
    _write_keys(f, KEYS[2:])
    clock.t += 10_000
    assert a.authenticate(bearer(ACME_KEY)).tenant == "acme"
    assert "keys_reload_s" in AuthConfig.model_fields and AuthConfig.model_fields["keys_reload_s"].description
