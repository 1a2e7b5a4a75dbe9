"""A Hub-compatible HTTP stand-in on loopback, enough for huggingface_hub's create_repo / upload_folder.

It speaks the endpoints the real client calls (whoami, repos/create, validate-yaml, preupload, commit, repo info),
keeps every uploaded file in memory, and records every request so tests can check what left the trainer. Every
file is declared "regular" at preupload, so contents arrive base64-encoded inside the commit (no LFS/Xet server).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "fipo-user"


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubStandIn:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append({"method": method, "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                status, payload = hub.route(method, self.path.split("?")[0], body)
                self._reply(status, payload)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        return Handler

    # --- the API -------------------------------------------------------------------------------------------------

    def route(self, method: str, path: str, body: bytes):
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization') or USER}/{request['name']}"
            if repo_id not in self.repos:
                self.repos[repo_id] = Repo(repo_id, private=request.get("visibility") == "private")
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|revision)/([^/]+))?", path)
        if not match or match.group(1) not in self.repos:
            return 404, {"error": f"not found: {method} {path}"}
        repo = self.repos[match.group(1)]
        action = match.group(2)
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        if method == "POST" and action == "commit":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    prefix = item["value"]["path"]
                    for name in [n for n in repo.files if n == prefix or n.startswith(prefix.rstrip("/") + "/")]:
                        del repo.files[name]
                elif item["key"] != "header":
                    return 400, {"error": f"the stand-in only accepts regular files, got {item['key']}"}
            oid = hashlib.sha1(body).hexdigest()
            repo.commits.append(oid)
            return 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None}
        if method == "GET":
            return 200, {"id": repo.repo_id, "modelId": repo.repo_id, "private": repo.private,
                         "sha": repo.commits[-1] if repo.commits else "0" * 40,
                         "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
        return 404, {"error": f"not found: {method} {path}"}


def hub_env(endpoint, token):
    """The environment of a process that pushes to the stand-in at ``endpoint`` with ``token``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN=token, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2")
    env.pop("TRANSFORMERS_OFFLINE", None)  # transformers turns it into HF_HUB_OFFLINE, which blocks every push
    return env
