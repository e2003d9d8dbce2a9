"""A GraphQL upstream on Strawberry (ASGI, served by uvicorn), as Python services run it: it
executes queries from `?query=` on GET and multipart bodies as well as JSON. Every root field it
executes is appended to the log file as one JSON line: what really ran."""

import json
import sys

import strawberry
import uvicorn
from strawberry.asgi import GraphQL
from strawberry.types import Info

PORT, LOG = int(sys.argv[1]), sys.argv[2]


def executed(field: str, info: Info, **args) -> None:
    request = info.context["request"]
    with open(LOG, "a", encoding="utf-8") as log:
        log.write(
            json.dumps(
                {
                    "server": "strawberry",
                    "field": field,
                    "args": args,
                    "authorization": request.headers.get("authorization"),
                }
            )
            + "\n"
        )


@strawberry.input
class DomainInput:
    projectId: str
    environmentId: str
    domain: str


@strawberry.type
class Domain:
    id: str
    domain: str


@strawberry.type
class Project:
    id: str
    name: str


@strawberry.type
class Query:
    @strawberry.field
    def projects(self, info: Info) -> list[Project]:
        executed("projects", info)
        return [Project(id="p1", name="shop")]

    @strawberry.field
    def project(self, info: Info, id: str) -> Project:
        executed("project", info, id=id)
        return Project(id=id, name="shop")


@strawberry.type
class Mutation:
    @strawberry.mutation
    def customDomainCreate(self, info: Info, input: DomainInput) -> Domain:
        executed("customDomainCreate", info, input=vars(input))
        return Domain(id="d1", domain=input.domain)

    @strawberry.mutation
    def volumeDelete(self, info: Info, volumeId: str) -> bool:
        executed("volumeDelete", info, volumeId=volumeId)
        return True


app = GraphQL(strawberry.Schema(query=Query, mutation=Mutation), graphql_ide=None)


class Announce(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        port = self.servers[0].sockets[0].getsockname()[1]
        print(f"listening on {port}", flush=True)


if __name__ == "__main__":
    config = uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning", lifespan="off")
    Announce(config).run()
