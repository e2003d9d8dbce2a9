"""An upstream written the way Python services are: FastAPI with pydantic models, served by
uvicorn. FastAPI reads a JSON body whatever its */json type (Python's json keeps the last of
repeated names) and validates it into the model. Every call it executes is appended to the log
file as one JSON line: what really ran.

Usage: rest_fastapi.py PORT LOG   (PORT 0: any; prints "listening on PORT" once it listens)
"""

import json
import socket
import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

PORT, LOG = int(sys.argv[1]), sys.argv[2]
app = FastAPI()


def executed(entry: dict) -> None:
    entry["server"] = "fastapi"
    with open(LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")


class DeleteVolume(BaseModel):
    volumeId: str
    note: str = ""


class ScaleDeployment(BaseModel):
    namespace: str
    deployment: str
    replicas: int = 1


@app.post("/volumes/delete")
def delete_volume(call: DeleteVolume):
    executed({"route": "delete_volume", "volumeId": call.volumeId})
    return {"deleted": call.volumeId}


@app.post("/deployments/scale")
def scale_deployment(call: ScaleDeployment):
    executed({"route": "scale_deployment", "namespace": call.namespace, "deployment": call.deployment})
    return call


if __name__ == "__main__":
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", PORT))
    listener.listen(128)
    print(f"listening on {listener.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
