// A GraphQL upstream on express-graphql (graphql-js 15), as many real servers run: it executes
// `?query=` from the URL, form-encoded bodies and application/graphql bodies as well as JSON.
// Every root field it executes is appended to the log file as one JSON line: what really ran.
"use strict";
const fs = require("fs");
const express = require("express");
const { graphqlHTTP } = require("express-graphql");
const { buildSchema } = require("graphql");

const [port, log] = [process.argv[2] || "0", process.argv[3]];
const executed = (field, args, request) =>
  fs.appendFileSync(
    log,
    JSON.stringify({ server: "express-graphql", field, args, authorization: request.headers.authorization || null }) + "\n",
  );

const schema = buildSchema(`
  input DomainInput { projectId: String!, environmentId: String!, domain: String! }
  type Domain { id: String!, domain: String! }
  type Project { id: String!, name: String! }
  type Query {
    projects: [Project!]!
    project(id: String!): Project
    customDomains(projectId: String!, environmentId: String!): [Domain!]!
    echo: String
  }
  type Mutation {
    customDomainCreate(input: DomainInput!): Domain!
    volumeDelete(volumeId: String!): Boolean!
  }
`);
const root = {
  projects: (args, request) => {
    executed("projects", args, request);
    return [{ id: "p1", name: "shop" }];
  },
  project: (args, request) => {
    executed("project", args, request);
    return { id: args.id, name: "shop" };
  },
  customDomains: (args, request) => {
    executed("customDomains", args, request);
    return [];
  },
  // Echoes the credential the upstream received: a response the gateway must mask.
  echo: (args, request) => {
    executed("echo", args, request);
    return request.headers.authorization || "";
  },
  customDomainCreate: (args, request) => {
    executed("customDomainCreate", args, request);
    return { id: "d1", domain: args.input.domain };
  },
  volumeDelete: (args, request) => {
    executed("volumeDelete", args, request);
    return true;
  },
};

const app = express();
// At /graphql, and at /graphql/v2 as Railway's API is.
app.use(["/graphql/v2", "/graphql"], graphqlHTTP({ schema, rootValue: root, graphiql: false }));
const server = app.listen(Number(port), "127.0.0.1", () =>
  console.log(`listening on ${server.address().port}`),
);
