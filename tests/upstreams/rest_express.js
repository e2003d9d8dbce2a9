// A REST upstream on Express with the common method-override middleware (header and `_method`
// query forms) and gzip compression, as many real APIs run. Every request a route handles is
// appended to the log file as one JSON line with the method the route saw: what really ran.
"use strict";
const fs = require("fs");
const express = require("express");
const methodOverride = require("method-override");
const compression = require("compression");

const [port, log] = [process.argv[2] || "0", process.argv[3]];
const app = express();
app.use(compression({ threshold: 0 }));
app.use(methodOverride("X-HTTP-Method-Override"));
app.use(methodOverride("X-HTTP-Method"));
app.use(methodOverride("X-Method-Override"));
app.use(methodOverride("_method"));
// JSON in every */json type and forms with qs (extended), as many APIs accept both.
app.use(express.json({ type: ["application/json", "application/*+json"] }));
app.use(express.urlencoded({ extended: true }));
// And the method from a body's `_method`, as method-override's README shows for forms.
app.use(
  methodOverride((request) => {
    if (request.body && typeof request.body === "object" && "_method" in request.body) {
      const method = request.body._method;
      delete request.body._method;
      return method;
    }
  }),
);

const executed = (request) =>
  fs.appendFileSync(
    log,
    JSON.stringify({
      server: "express",
      method: request.method,
      path: request.path,
      query: request.query,
      headers: request.headers,
    }) + "\n",
  );

app.all("/repos/:owner/:repo/pulls", (request, response) => {
  executed(request);
  response.json({ method: request.method, path: request.path });
});
// Deletes the volume the body names, read as Express's parsers read it (JSON or form).
app.post("/volumes/delete", (request, response) => {
  const volumeId = request.body && request.body.volumeId;
  fs.appendFileSync(
    log,
    JSON.stringify({ server: "express", route: "delete_volume", volumeId, content_type: request.headers["content-type"] }) + "\n",
  );
  response.json({ deleted: volumeId });
});
app.post("/deployments/scale", (request, response) => {
  const { namespace, deployment } = request.body || {};
  fs.appendFileSync(log, JSON.stringify({ server: "express", route: "scale_deployment", namespace, deployment }) + "\n");
  response.json(request.body);
});
// Echoes every request header, the credential included: a response the gateway must mask, in
// whatever encoding the client asked for.
app.get("/echo", (request, response) => {
  executed(request);
  const text = JSON.stringify({ headers: request.headers, padding: "x".repeat(2048) });
  const range = request.headers.range && /^bytes=(\d+)-(\d+)$/.exec(request.headers.range);
  if (range) {
    const [start, end] = [Number(range[1]), Number(range[2])];
    response.status(206).set("Content-Range", `bytes ${start}-${end}/${text.length}`);
    return response.send(text.slice(start, end + 1));
  }
  response.type("application/json").send(text);
});
// Compresses whatever the client asked for, as a misbehaving upstream might: the gateway must not
// pass an encoded answer it cannot mask.
app.get("/gzip-anyway", (request, response) => {
  executed(request);
  const body = require("zlib").gzipSync(JSON.stringify({ authorization: request.headers.authorization }));
  response.set("Content-Encoding", "gzip").type("application/json").send(body);
});
// Redirects to a URL carrying the credential, as an upstream's error page might.
app.get("/redirect", (request, response) => {
  executed(request);
  response.redirect(302, `/login?token=${encodeURIComponent(request.headers.authorization || "")}`);
});
app.use((request, response) => {
  executed(request);
  response.status(404).json({ error: "no such route" });
});
const server = app.listen(Number(port), "127.0.0.1", () =>
  console.log(`listening on ${server.address().port}`),
);
