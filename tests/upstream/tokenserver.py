"""A Docker-Hub-like token server (``auth.docker.io`` stand-in) for the test upstream.

Run as ``python -m tests.upstream.tokenserver --port-file F --log F ...``; it binds an
ephemeral port on 127.0.0.1, serves HTTPS and writes the port to ``--port-file`` once it
accepts connections, so the parent never races on a pre-picked port.  The endpoint is
``/token`` unless ``--path`` names another (the ghcr.io-like upstream uses one, so a
proxy that guesses the realm instead of reading the challenge gets a 404).

Implements both flavours clients use (distribution's ``docs/spec/auth/token.md`` and
``oauth.md``):

* ``GET /token?service=..&scope=..&scope=..`` with optional Basic credentials;
  ``offline_token=true`` adds a ``refresh_token`` for authenticated users.
* ``POST /token`` with an OAuth2 form: ``grant_type=password`` or
  ``grant_type=refresh_token``; ``scope`` is space-separated.

Every request is appended as one JSON line to ``--log`` so tests can assert exactly
what a proxy forwarded (repeated scopes, service, credentials or not).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import secrets
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.upstream.tokens import EXPIRES_IN, USERS, Signer, grant, issued_at


class TokenServer(ThreadingHTTPServer):
    """Holds the signer, the refresh-token table and the request log."""

    daemon_threads = True

    def __init__(
        self,
        signer: Signer,
        log_path: Path,
        context: ssl.SSLContext,
        token_path: str = "/token",
    ) -> None:
        super().__init__(("127.0.0.1", 0), TokenHandler)
        self.token_path = token_path
        # Handshake lazily in the handler thread, so one stalled client cannot
        # block accept() for everybody.
        self.socket = context.wrap_socket(
            self.socket, server_side=True, do_handshake_on_connect=False
        )
        self.signer = signer
        self.refresh_tokens: dict[str, str] = {}
        self._log_lock = threading.Lock()
        self._log = log_path.open("a", encoding="utf-8")

    def log_request_json(self, entry: dict[str, Any]) -> None:
        with self._log_lock:
            self._log.write(json.dumps(entry, sort_keys=True) + "\n")
            self._log.flush()


class TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TokenServer
    server_version = "regproxy-test-auth/1.0"

    # -- plumbing ----------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log; the JSON log is the record."""

    def _send_json(
        self, status: int, body: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _basic_credentials(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return ("", "")
        return (user, password)

    # -- handlers ----------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            # Readiness probe of the Hub; kept out of the request log on purpose.
            self._send_json(200, {"status": "ok"})
            return
        query = parse_qs(url.query, keep_blank_values=True)
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": "GET",
            "path": url.path,
            "query": query,
            "authorization": "Authorization" in self.headers,
            "username": None,
            "scopes_requested": [],
            "scopes_granted": [],
        }
        try:
            if url.path != self.server.token_path:
                entry["status"] = 404
                self._send_json(404, {"details": "not found"})
                return
            user: str | None = None
            creds = self._basic_credentials()
            if creds is not None:
                if USERS.get(creds[0]) != creds[1] or not creds[0]:
                    entry.update(status=401, username=creds[0] or None)
                    self._unauthorized()
                    return
                user = creds[0]
            entry["username"] = user
            scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
            entry["scopes_requested"] = scopes
            granted = grant(user, scopes)
            entry["scopes_granted"] = [str(s) for s in granted]
            token = self.server.signer.sign(user, granted)
            body: dict[str, Any] = {
                "token": token,
                "access_token": token,
                "expires_in": EXPIRES_IN,
                "issued_at": issued_at(),
            }
            if (
                user is not None
                and query.get("offline_token", [""])[-1].lower() == "true"
            ):
                body["refresh_token"] = self._new_refresh_token(user)
            entry["status"] = 200
            self._send_json(200, body)
        finally:
            self.server.log_request_json(entry)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        logged_form = {
            k: (["<redacted>"] if k in ("password",) else v) for k, v in form.items()
        }
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": "POST",
            "path": url.path,
            "query": parse_qs(url.query, keep_blank_values=True),
            "form": logged_form,
            "authorization": "Authorization" in self.headers,
            "username": None,
            "scopes_requested": [],
            "scopes_granted": [],
        }
        try:
            if url.path != self.server.token_path:
                entry["status"] = 404
                self._send_json(404, {"details": "not found"})
                return

            def field(name: str) -> str:
                return form.get(name, [""])[-1]

            grant_type = field("grant_type")
            refresh: str | None = None
            if grant_type == "password":
                user = field("username")
                entry["username"] = user or None
                if not user or USERS.get(user) != field("password"):
                    entry["status"] = 401
                    self._unauthorized()
                    return
                if field("access_type") == "offline":
                    refresh = self._new_refresh_token(user)
            elif grant_type == "refresh_token":
                refresh = field("refresh_token")
                found = self.server.refresh_tokens.get(refresh)
                if found is None:
                    entry["status"] = 401
                    self._unauthorized("invalid refresh token")
                    return
                user = found
                entry["username"] = user
            else:
                entry["status"] = 400
                self._send_json(
                    400,
                    {
                        "error": "unsupported_grant_type",
                        "error_description": f"grant_type {grant_type!r}",
                    },
                )
                return
            scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
            entry["scopes_requested"] = scopes
            granted = grant(user, scopes)
            entry["scopes_granted"] = [str(s) for s in granted]
            token = self.server.signer.sign(user, granted)
            body: dict[str, Any] = {
                "token": token,
                "access_token": token,
                "expires_in": EXPIRES_IN,
                "issued_at": issued_at(),
                "scope": " ".join(str(s) for s in granted),
            }
            if refresh is not None:
                body["refresh_token"] = refresh
            entry["status"] = 200
            self._send_json(200, body)
        finally:
            self.server.log_request_json(entry)

    def _unauthorized(self, message: str = "incorrect username or password") -> None:
        """Docker Hub answers bad credentials with 401 and a JSON body."""
        self._send_json(
            401,
            {
                "details": message,
                "errors": [
                    {"code": "UNAUTHORIZED", "message": message, "detail": None}
                ],
            },
            {"WWW-Authenticate": 'Basic realm="regproxy test auth"'},
        )

    def _new_refresh_token(self, user: str) -> str:
        token = secrets.token_urlsafe(24)
        self.server.refresh_tokens[token] = user
        return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cert", type=Path, required=True, help="TLS server certificate (PEM chain)"
    )
    parser.add_argument("--key", type=Path, required=True, help="TLS server key")
    parser.add_argument("--signing-cert", type=Path, required=True)
    parser.add_argument("--signing-key", type=Path, required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument(
        "--log", type=Path, required=True, help="JSON-lines request log"
    )
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument(
        "--path", default="/token", help="the token endpoint's path (the realm's)"
    )
    args = parser.parse_args(argv)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    signer = Signer.from_files(
        args.signing_key, args.signing_cert, args.issuer, args.service
    )
    server = TokenServer(signer, args.log, context, args.path)
    port = server.server_address[1]
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, args.port_file)
    sys.stdout.write(f"token server listening on https://127.0.0.1:{port}{args.path}\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
