"""A small Hugging Face Hub for tests: the HTTP endpoints huggingface_hub 2.4 calls to create repositories and
branches, open pull requests (refs/pr/N, against main), commit files, read model info and file trees, download
files, and validate model-card metadata, over an on-disk store, served on 127.0.0.1 by a thread.

Store (under `root`):

    blobs/<sha256>                        file contents, content-addressed: a file pushed twice is stored once
    repos/<ns>/<name>/repo.json           {"private": bool, "refs": {"main": sha, "dev": sha, "refs/pr/1": sha},
                                           "pull_requests": n}
    repos/<ns>/<name>/commits/<sha>.json  {"parent", "message", "files": {path: {"blob", "oid", "size"}},
                                           "changed": [paths added or deleted by this commit]}

Preupload answers `uploadMode: "regular"` for every file, so clients inline contents in the commit (no LFS, no
Xet), and returns each path's current git oid, with which huggingface_hub leaves unchanged files out of a commit,
as on the Hub. A missing file is a 404 with `X-Error-Code: EntryNotFound` (transformers probes optional files).
Writes need an `Authorization` header; any token is user `testuser`, except REVOKED_TOKEN, which gets 401.

    with HubServer(tmp_path) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}   # for a fresh process
"""

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

USER = "testuser"
# what /api/validate-yaml accepts (the Hub's own lists are longer)
LICENSES = {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "gpl-3.0",
            "llama2", "llama3", "llama3.1", "llama3.2", "gemma", "openrail", "other", "unknown"}
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
PIPELINE_TAGS = {"text-generation", "text-classification", "token-classification", "feature-extraction",
                 "fill-mask", "question-answering", "summarization", "translation"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def git_oid(content: bytes) -> str:
    """The git blob id of `content`: what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def card_metadata_errors(content: str) -> list[str]:
    """The reasons the Hub would refuse this README.md's YAML metadata block (empty: valid)."""
    match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
    if match is None:
        return []
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"metadata is not valid YAML: {error}"]
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("tags", "datasets", "language"):
        if key in metadata and not (isinstance(metadata[key], list) and all(isinstance(v, str) for v in
                                                                             metadata[key])):
            errors.append(f"`{key}` must be a list of strings")
    if "license" in metadata and metadata["license"] not in LICENSES:
        errors.append(f"`license`={metadata['license']!r} is not a known license identifier")
    if metadata.get("license") == "other" and "license_name" not in metadata:
        errors.append("`license: other` needs `license_name`")
    base_models = metadata.get("base_model")
    base_models = [base_models] if isinstance(base_models, str) else base_models
    if base_models is not None and not (isinstance(base_models, list) and all(
            isinstance(name, str) and _REPO_ID.fullmatch(name) for name in base_models)):
        errors.append(f"`base_model`={metadata['base_model']!r} must be model ids (`name` or `owner/name`)")
    if "base_model_relation" in metadata:
        if metadata["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append(f"`base_model_relation`={metadata['base_model_relation']!r} is not one of "
                          f"{sorted(BASE_MODEL_RELATIONS)}")
        if base_models is None:
            errors.append("`base_model_relation` needs `base_model`")
    if "pipeline_tag" in metadata and metadata["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f"`pipeline_tag`={metadata['pipeline_tag']!r} is not a known pipeline tag")
    if "library_name" in metadata and not isinstance(metadata["library_name"], str):
        errors.append("`library_name` must be a string")
    return errors


REVOKED_TOKEN = "hf_revoked"


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **fields):
        super().__init__(message)
        self.status, self.error_code, self.fields = status, error_code, fields


class HubStore:
    """Repositories, refs and commits on disk; every method is called under the server's lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(exist_ok=True)
        self._commits = 0

    # repositories and refs
    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def repo(self, repo_id: str, authorized: bool = True) -> dict:
        """The repository's record; without authorization a private repository does not exist, as on the Hub."""
        path = self._repo_dir(repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        repo = json.loads(path.read_text())
        if repo["private"] and not authorized:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")  # the Hub hides private repos
        return repo

    def _save_repo(self, repo_id: str, repo: dict) -> None:
        (self._repo_dir(repo_id) / "repo.json").write_text(json.dumps(repo, indent=1))

    def create_repo(self, repo_id: str, private: bool, url: str) -> None:
        if (self._repo_dir(repo_id) / "repo.json").is_file():
            raise HubError(409, "You already created this model repo", url=url)
        (self._repo_dir(repo_id) / "commits").mkdir(parents=True)
        self._save_repo(repo_id, {"private": private, "refs": {}, "pull_requests": 0})
        # the Hub starts every repository with one commit holding .gitattributes
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        sha = self._write_commit(repo_id, None, "initial commit", {".gitattributes": self._blob(attributes)},
                                 [".gitattributes"])
        self._set_ref(repo_id, "main", sha)

    def _set_ref(self, repo_id: str, ref: str, sha: str) -> None:
        repo = self.repo(repo_id)
        repo["refs"][ref] = sha
        self._save_repo(repo_id, repo)

    def resolve(self, repo_id: str, revision: str, authorized: bool = True) -> str:
        """The commit sha of a branch, PR ref or commit sha."""
        repo = self.repo(repo_id, authorized)
        if revision in repo["refs"]:
            return repo["refs"][revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and (self._repo_dir(repo_id) / "commits" / f"{revision}.json"
                                                        ).is_file():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_branch(self, repo_id: str, branch: str, starting_point: str | None) -> None:
        repo = self.repo(repo_id)
        if branch in repo["refs"]:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        self._set_ref(repo_id, branch, self.resolve(repo_id, starting_point or "main"))

    # commits and files
    def commit(self, repo_id: str, revision: str) -> dict:
        sha = self.resolve(repo_id, revision)
        return {"sha": sha, **json.loads((self._repo_dir(repo_id) / "commits" / f"{sha}.json").read_text())}

    def history(self, repo_id: str, revision: str = "main") -> list[dict]:
        """Commits from `revision` back to the first, newest first."""
        commits, sha = [], self.resolve(repo_id, revision)
        while sha is not None:
            commits.append(self.commit(repo_id, sha))
            sha = commits[-1]["parent"]
        return commits

    def files(self, repo_id: str, revision: str = "main", authorized: bool = True) -> dict[str, dict]:
        self.repo(repo_id, authorized)
        return self.commit(repo_id, revision)["files"]

    def read(self, entry: dict) -> bytes:
        return (self.root / "blobs" / entry["blob"]).read_bytes()

    def _blob(self, content: bytes) -> dict:
        digest = hashlib.sha256(content).hexdigest()
        path = self.root / "blobs" / digest
        if not path.exists():
            path.write_bytes(content)
        return {"blob": digest, "oid": git_oid(content), "size": len(content)}

    def _write_commit(self, repo_id: str, parent: str | None, message: str, files: dict, changed: list[str]) -> str:
        self._commits += 1
        record = {"parent": parent, "message": message, "files": files, "changed": changed}
        sha = hashlib.sha1(json.dumps([record, self._commits, repo_id], sort_keys=True).encode()).hexdigest()
        (self._repo_dir(repo_id) / "commits" / f"{sha}.json").write_text(json.dumps(record, indent=1))
        return sha

    def open_pull_request(self, repo_id: str) -> int:
        """A new pull request against main: its ref refs/pr/N starts at main's head; returns N."""
        repo = self.repo(repo_id)
        repo["pull_requests"] += 1
        self._save_repo(repo_id, repo)
        self._set_ref(repo_id, f"refs/pr/{repo['pull_requests']}", repo["refs"]["main"])
        return repo["pull_requests"]

    def apply_commit(self, repo_id: str, revision: str, operations: list[dict], create_pr: bool) -> tuple[str, int]:
        """Commit NDJSON `operations` on the branch `revision`, or on a new refs/pr/N; returns (sha, N or 0)."""
        repo = self.repo(repo_id)
        if revision not in repo["refs"]:  # a branch or a pull request's ref (commits go on top of it)
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        header = next((op["value"] for op in operations if op["key"] == "header"), {})
        head = repo["refs"][revision]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, changed = dict(self.commit(repo_id, head)["files"]), []
        for op in operations:
            key, value = op["key"], op["value"]
            if key == "file":
                files[value["path"]] = self._blob(base64.b64decode(value["content"]))
                changed.append(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                changed.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [path for path in files if path.startswith(prefix)]:
                    del files[path]
                    changed.append(path)
            elif key in ("lfsFile", "copyFile"):
                raise HubError(422, f"{key} operations are not supported by this test server (regular uploads only)")
        sha = self._write_commit(repo_id, head, header.get("summary", ""), files, changed)
        number = self.open_pull_request(repo_id) if create_pr else 0
        self._set_ref(repo_id, f"refs/pr/{number}" if create_pr else revision, sha)
        return sha, number


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # keep test output clean; the server keeps its own log
        pass

    # plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _token(self) -> str | None:
        authorization = self.headers.get("Authorization", "")
        return authorization.removeprefix("Bearer ").strip() or None

    def _authorized(self) -> bool:
        return self._token() not in (None, REVOKED_TOKEN)

    def _require_token(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        segments = [urllib.parse.unquote(part) for part in url.path.strip("/").split("/")]
        query = urllib.parse.parse_qs(url.query)
        self.server.log.append(f"{self.command} {url.path}")
        try:
            with self.server.lock:
                self._route(segments, query)
        except HubError as error:
            headers = {"X-Error-Code": error.error_code, "X-Error-Message": str(error)} if error.error_code else {}
            self._json({"error": str(error), **error.fields}, error.status, headers)

    do_GET = do_HEAD = do_POST = _dispatch

    # routes
    def _route(self, segments: list[str], query: dict) -> None:
        store, method = self.server.store, self.command
        if segments[:2] == ["api", "whoami-v2"]:
            self._require_token()
            return self._json({"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})
        if segments[:3] == ["api", "repos", "create"] and method == "POST":
            self._require_token()
            body = json.loads(self._body())
            repo_id = f"{body.get('organization') or USER}/{body['name']}"
            private = body.get("visibility", "private" if body.get("private") else "public") == "private"
            store.create_repo(repo_id, private, f"{self.server.url}/{repo_id}")
            return self._json({"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if segments[:2] == ["api", "validate-yaml"] and method == "POST":
            errors = card_metadata_errors(json.loads(self._body()).get("content", ""))
            return self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            return self._route_model_api("/".join(segments[2:4]), segments[4:], query)
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve("/".join(segments[:2]), segments[3], "/".join(segments[4:]))
        raise HubError(404, f"no route for {method} /{'/'.join(segments)} on this test server")

    def _route_model_api(self, repo_id: str, rest: list[str], query: dict) -> None:
        store, method = self.server.store, self.command
        if method == "GET" and (not rest or rest[0] == "revision"):
            revision = rest[1] if rest else "main"
            return self._model_info(repo_id, revision)
        if method == "GET" and rest[0] == "tree":
            return self._tree(repo_id, rest[1], "/".join(rest[2:]), query.get("recursive", ["false"])[0] == "true")
        if method == "GET" and rest[0] == "refs":
            repo = store.repo(repo_id, self._authorized())
            branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                        for name, sha in repo["refs"].items() if not name.startswith("refs/pr/")]
            prs = [{"name": name, "ref": name, "targetCommit": sha} for name, sha in repo["refs"].items()
                   if name.startswith("refs/pr/")]
            return self._json({"branches": branches, "converts": [], "tags": [],
                               **({"pullRequests": prs} if query.get("include_prs") else {})})
        if method == "GET" and rest[0] == "discussions":
            number = int(rest[1])
            store.resolve(repo_id, f"refs/pr/{number}", self._authorized())
            return self._json({
                "num": number, "title": f"Pull request {number}", "author": {"name": USER}, "status": "draft",
                "createdAt": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), "isPullRequest": True,
                "repo": {"name": repo_id, "type": "model"}, "events": [], "filesWithConflicts": [],
                "changes": {"base": "refs/heads/main"}, "diff": "",
            })
        self._require_token()
        create_pr = query.get("create_pr", ["0"])[0] == "1"
        if method == "POST" and rest[0] == "discussions":
            if not json.loads(self._body()).get("pullRequest"):
                raise HubError(422, "this test server opens pull requests only, not discussions")
            return self._json({"num": store.open_pull_request(repo_id)})
        if method == "POST" and rest[0] == "branch":
            body = json.loads(self._body() or b"{}")
            store.create_branch(repo_id, "/".join(rest[1:]), body.get("startingPoint"))
            return self._json({})
        if method == "POST" and rest[0] == "preupload":
            revision = "/".join(rest[1:])
            current = store.files(repo_id, revision, self._authorized())
            entries = [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False,
                        "oid": current[file["path"]]["oid"] if file["path"] in current else None}
                       for file in json.loads(self._body())["files"]]
            return self._json({"files": entries, "commitOid": store.resolve(repo_id, revision, self._authorized())})
        if method == "POST" and rest[0] == "commit":
            revision = "/".join(rest[1:])
            operations = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            sha, number = store.apply_commit(repo_id, revision, operations, create_pr)
            reply = {"commitOid": sha, "commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}"}
            if create_pr:
                reply["pullRequestUrl"] = f"{self.server.url}/{repo_id}/discussions/{number}"
            return self._json(reply)
        raise HubError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)} on this test server")

    def _model_info(self, repo_id: str, revision: str) -> None:
        store = self.server.store
        repo = store.repo(repo_id, self._authorized())
        commit = store.commit(repo_id, revision)
        card = commit["files"].get("README.md")
        metadata = {}
        if card is not None:
            match = re.match(r"---\n(.*?)\n---\n", store.read(card).decode(), re.DOTALL)
            metadata = (yaml.safe_load(match.group(1)) if match else None) or {}
        now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self._json({
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit["sha"], "lastModified": now, "createdAt": now, "private": repo["private"],
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": metadata.get("tags", []),
            "pipeline_tag": metadata.get("pipeline_tag"), "library_name": metadata.get("library_name"),
            "cardData": metadata, "siblings": [{"rfilename": path} for path in sorted(commit["files"])],
        })

    def _tree(self, repo_id: str, revision: str, prefix: str, recursive: bool) -> None:
        files = self.server.store.files(repo_id, revision, self._authorized())
        base = prefix.rstrip("/") + "/" if prefix else ""
        entries, folders = [], set()
        for path, entry in sorted(files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append({"type": "file", "path": path, "oid": entry["oid"], "size": entry["size"]})
        entries += [{"type": "directory", "path": folder, "oid": git_oid(folder.encode()), "size": 0}
                    for folder in sorted(folders)]
        if base and not entries:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        sha = store.resolve(repo_id, revision, self._authorized())
        entry = store.files(repo_id, sha, self._authorized()).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = store.read(entry)
        self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'},
                   content_type="application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: HubStore):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store, self.lock, self.log = store, threading.RLock(), []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """The test Hub on 127.0.0.1 and an ephemeral port, storing under `root`; a context manager.

    `url` is the value for HF_ENDPOINT; `store` answers what the repositories hold (`files`, `history`, `read`);
    `log` lists the requests served ("METHOD /path")."""

    def __init__(self, root: str | Path):
        self.store = HubStore(root)
        self._server = _Server(self.store)
        self.url, self.log = self._server.url, self._server.log
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
