"""An agent's MCP client (the real MCP Python SDK, mcp 2.3) pointed at Valet's gateway with a
Valet token as its bearer. Runs a list of steps and prints one JSON line per step, so the Rust
end-to-end tests (and people) see what an MCP client sees.

Usage: mcp_agent.py URL TOKEN MODE STEPS_JSON
  MODE: "legacy" (initialize handshake, 2025-11-25) or "2026-07-28" (stateless).
  STEPS_JSON: [["list_tools"], ["call_tool", NAME, {ARGS}], ["list_resources"],
               ["read_resource", URI], ["get_prompt", NAME, {ARGS}]]
"""

import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def plain(value):
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return value


async def main(url, token, mode, steps):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120)
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        for step in steps:
            kind, *arguments = step
            try:
                if kind == "list_tools":
                    result = [tool.name for tool in (await client.list_tools()).tools]
                elif kind == "call_tool":
                    progress = []

                    async def heard(done, total, message):
                        progress.append(message)

                    called = await client.call_tool(arguments[0], arguments[1], progress_callback=heard)
                    result = plain(called)
                    if progress:
                        result["progress"] = progress
                elif kind == "list_resources":
                    result = [str(resource.uri) for resource in (await client.list_resources()).resources]
                elif kind == "read_resource":
                    result = plain(await client.read_resource(arguments[0]))
                elif kind == "get_prompt":
                    result = plain(await client.get_prompt(arguments[0], arguments[1]))
                else:
                    raise ValueError(f"unknown step {kind}")
                print(json.dumps({"step": kind, "ok": True, "result": result}), flush=True)
            except Exception as error:  # noqa: BLE001 - every failure is reported, as a client would
                print(json.dumps({"step": kind, "ok": False, "error": f"{type(error).__name__}: {error}"}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
