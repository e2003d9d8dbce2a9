"""A deployment platform's MCP server on the real MCP Python SDK (mcp 2.3), for the gateway's MCP
tests and the `mcp` benchmark. Its account token comes from DEPLOY_TOKEN in its environment
(valetd puts it there); every tool, resource and prompt it executes is appended to a JSON-lines
log, so tests assert from the server's own record of what ran.

Usage:
  mcp_deploy.py PORT LOG          Streamable HTTP on 127.0.0.1:PORT (0: any), at /mcp; prints
                                  "listening on PORT"; every request must carry
                                  Authorization: Bearer $DEPLOY_TOKEN.
  mcp_deploy.py --stdio LOG       stdio, as valetd runs it.
"""

import hashlib
import json
import os
import socket
import sys

from mcp.server import MCPServer

TOKEN = os.environ.get("DEPLOY_TOKEN", "")
LOG = sys.argv[-1]

server = MCPServer("deploy-platform")


def executed(kind, name, arguments):
    with open(LOG, "a", encoding="utf-8") as log:
        log.write(
            json.dumps(
                {
                    "kind": kind,
                    "name": name,
                    "arguments": arguments,
                    "pid": os.getpid(),
                    "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                }
            )
            + "\n"
        )


@server.tool()
def list_projects() -> list[str]:
    """Every project of the account."""
    executed("tool", "list_projects", {})
    return ["p-shop", "p-blog"]


@server.tool()
def list_volumes(projectId: str) -> list[str]:
    """The volumes of a project."""
    executed("tool", "list_volumes", {"projectId": projectId})
    return [f"{projectId}-db", f"{projectId}-cache"]


@server.tool()
def create_custom_domain(projectId: str, environment: str, domain: str, port: int = 443) -> str:
    """Attach a custom domain to a project's environment."""
    executed(
        "tool",
        "create_custom_domain",
        {"projectId": projectId, "environment": environment, "domain": domain, "port": port},
    )
    return f"{domain} -> {projectId}/{environment}:{port}"


@server.tool()
def delete_volume(volumeId: str) -> str:
    """Delete a volume and its backups. Irreversible."""
    executed("tool", "delete_volume", {"volumeId": volumeId})
    return f"deleted {volumeId}"


@server.tool()
def delete_project(projectId: str) -> str:
    """Delete a project with everything in it. Irreversible."""
    executed("tool", "delete_project", {"projectId": projectId})
    return f"deleted {projectId}"


@server.tool()
def account_settings() -> str:
    """The account's settings, which (carelessly) include its token."""
    executed("tool", "account_settings", {})
    return f"account token: {TOKEN}"


@server.tool()
def crash() -> str:
    """Exits the server process, as a crashing server would."""
    executed("tool", "crash", {})
    os._exit(3)


@server.resource("deploy://projects/{projectId}/status")
def project_status(projectId: str) -> str:
    """A project's status."""
    executed("resource", "project_status", {"projectId": projectId})
    return f"{projectId}: healthy"


@server.prompt()
def summarise(projectId: str) -> str:
    """Ask for a summary of a project."""
    executed("prompt", "summarise", {"projectId": projectId})
    return f"Summarise the state of {projectId}."


def serve_http(port):
    import uvicorn
    from starlette.responses import JSONResponse
    from mcp.server.transport_security import TransportSecuritySettings

    app = server.streamable_http_app(
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False)
    )

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"authorization", b"").decode() != f"Bearer {TOKEN}":
                executed("refused", "unauthorized", {"path": scope["path"]})
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
        await app(scope, receive, send)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it: no 40 ms Nagle / delayed-ACK stall on keep-alive connections.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", port))
    # Listening before saying so: a client that connects as soon as it reads the line is queued,
    # never refused (uvicorn listens again on the same socket, which only sets the backlog).
    listener.listen(128)
    print(f"listening on {listener.getsockname()[1]}", flush=True)
    config = uvicorn.Config(guarded, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    if sys.argv[1] == "--stdio":
        server.run("stdio")
    else:
        serve_http(int(sys.argv[1]))
