#!/usr/bin/env python3
"""A tiny deployment platform's API, for the README's tour: the upstream behind the gateway route
`/u/demo` of deploy/examples/valet.toml. It works offline, needs nothing but Python 3's standard
library, and prints one line for every call it executes, so you see what reached it (and what
Valet kept from it).

    python3 deploy/examples/demo-api.py            # 127.0.0.1:7472, as valet.toml expects
    python3 deploy/examples/demo-api.py --port 0   # any free port (tests)

Every request must carry `Authorization: Bearer <the token in demo-secrets/demo-api-token>`: the
"root credential" only valetd holds. The API (JSON):

    GET    /projects                              every project
    GET    /projects/{project}/volumes            a project's volumes
    POST   /projects/{project}/domains            {"domain": "..."}: attach a custom domain
    DELETE /projects/{project}/volumes/{volume}   delete a volume and its backups
    DELETE /projects/{project}                    delete a project with everything in it
"""

import argparse
import json
import pathlib
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = (pathlib.Path(__file__).resolve().parent / "demo-secrets" / "demo-api-token").read_text().strip()

projects = {
    "shop": {"volumes": ["shop-db", "shop-cache"], "domains": []},
    "prod-db": {"volumes": ["prod-db-data"], "domains": []},
}


class Api(BaseHTTPRequestHandler):
    server_version = "demo-api"

    def log_message(self, format, *arguments):  # the executed lines are the log
        pass

    def answer(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def executed(self, what):
        print(f"executed: {self.command} {self.path} ({what})", flush=True)

    def route(self):
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            print(f"refused: {self.command} {self.path} (no valid credential)", flush=True)
            return self.answer(401, {"error": "a valid API token is required"})
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if self.command == "GET" and path == "/projects":
            self.executed("listed projects")
            return self.answer(200, sorted(projects))
        match = re.fullmatch(r"/projects/([^/]+)(/volumes(?:/([^/]+))?|/domains)?", path)
        if not match or match.group(1) not in projects:
            return self.answer(404, {"error": "no such project or route"})
        project, rest, volume = match.group(1), match.group(2) or "", match.group(3)
        volumes = projects[project]["volumes"]
        if self.command == "GET" and rest == "/volumes":
            self.executed(f"listed the volumes of {project}")
            return self.answer(200, volumes)
        if self.command == "POST" and rest == "/domains":
            try:
                domain = json.loads(body)["domain"]
            except (ValueError, KeyError, TypeError):
                return self.answer(400, {"error": 'send {"domain": "..."}'})
            projects[project]["domains"].append(domain)
            self.executed(f"attached {domain} to {project}")
            return self.answer(201, {"project": project, "domain": domain})
        if self.command == "DELETE" and volume is not None:
            if volume not in volumes:
                return self.answer(404, {"error": f"no volume {volume} in {project}"})
            volumes.remove(volume)
            self.executed(f"DELETED volume {volume} of {project}, backups included")
            return self.answer(200, {"deleted": volume})
        if self.command == "DELETE" and rest == "":
            del projects[project]
            self.executed(f"DELETED project {project} with everything in it")
            return self.answer(200, {"deleted": project})
        return self.answer(405, {"error": f"{self.command} is not served on {path}"})

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = route


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=7472)
    arguments = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", arguments.port), Api)  # listening once constructed
    print(f"demo API listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
