// An upstream that reflects its request into every channel of its answer, streaming bytes the
// agent chooses in chunks the agent chooses: the worst case of an API that echoes (a debug
// endpoint, job logs the agent can write into, an error page quoting headers). Wherever a part
// says "$AUTH", the Authorization header it received — the root credential — goes instead.
//
//   POST /reflect  {"status_message": "...", "header": "...", "trailer": "...",
//                   "chunks": ["...", "$AUTH", ...], "pause_ms": 25, "abort": false}
//
// With "abort", the answer is cut off after the last chunk (the connection or stream reset):
// the agent then gets exactly what the gateway had released by then.
// The status line's reason phrase, a header (x-reflect), each chunk of the body and (over HTTP/2)
// a trailer (x-trailer) carry what the agent asked, $AUTH replaced. Every request is appended to
// the log as one JSON line.
//
// Usage: node reflect.js PORT LOG                  HTTP/1.1 on 127.0.0.1:PORT (0: any)
//        node reflect.js PORT LOG CERT KEY         HTTP/2 over TLS (h2 by ALPN)
// Prints "listening on PORT" once it listens.
"use strict";
const fs = require("fs");
const http = require("http");
const http2 = require("http2");

const [port, log, cert, key] = process.argv.slice(2);

function plan(body) {
  try {
    return JSON.parse(body || "{}");
  } catch (error) {
    return { chunks: ["not JSON"] };
  }
}

// $AUTH as it came, and as encoders write it: $AUTH_URL (encodeURIComponent), $AUTH_URL2
// (that twice), $AUTH_JSON (JSON.stringify, and \u0026 for & as Go writes it), $AUTH_GOHTML (Go's
// html/template references inside Go's JSON), $AUTH_HTML (numeric references), $AUTH_B64 (base64
// of the whole header value), $AUTH_B64URL (that in a URL query).
function fill(text, auth) {
  const references = auth.replace(/[^A-Za-z0-9 ]/g, (character) => `&#${character.charCodeAt(0)};`);
  const forms = {
    $AUTH_URL2: encodeURIComponent(encodeURIComponent(auth)),
    $AUTH_GOHTML: references.split("&").join("\\u0026"),
    $AUTH_B64URL: encodeURIComponent(Buffer.from(auth).toString("base64")),
    $AUTH_URL: encodeURIComponent(auth),
    $AUTH_JSON: JSON.stringify(auth).slice(1, -1).split("&").join("\\u0026").split("/").join("\\/"),
    $AUTH_HTML: auth.replace(/[^A-Za-z0-9 ]/g, (character) => `&#${character.charCodeAt(0)};`),
    $AUTH_B64: Buffer.from(auth).toString("base64"),
  };
  let filled = String(text === undefined ? "" : text);
  for (const [name, value] of Object.entries(forms)) {
    filled = filled.split(name).join(value);
  }
  return filled.split("$AUTH").join(auth);
}

function readBody(request, done) {
  const parts = [];
  request.on("data", (part) => parts.push(part));
  request.on("end", () => done(Buffer.concat(parts).toString("utf8")));
}

async function stream(response, chunks, auth, pauseMs) {
  for (const chunk of chunks) {
    response.write(fill(chunk, auth));
    await new Promise((resolve) => setTimeout(resolve, pauseMs));
  }
}

function logged(request, asked) {
  fs.appendFileSync(log, JSON.stringify({ path: request.url, http: request.httpVersion, asked }) + "\n");
}

if (cert) {
  const server = http2.createSecureServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
  // A stream cut off on purpose (abort) must not take the server down with it.
  server.on("sessionError", () => {});
  server.on("stream", (h2stream, headers) => {
    h2stream.on("error", () => {});
    const parts = [];
    h2stream.on("data", (part) => parts.push(part));
    h2stream.on("end", async () => {
      const asked = plan(Buffer.concat(parts).toString("utf8"));
      const auth = headers.authorization || "";
      fs.appendFileSync(log, JSON.stringify({ path: headers[":path"], http: "2", asked }) + "\n");
      h2stream.respond(
        { ":status": 200, "content-type": "text/plain", "x-reflect": fill(asked.header, auth) },
        { waitForTrailers: true },
      );
      h2stream.on("wantTrailers", () => h2stream.sendTrailers({ "x-trailer": fill(asked.trailer, auth) }));
      for (const chunk of asked.chunks || []) {
        h2stream.write(fill(chunk, auth));
        await new Promise((resolve) => setTimeout(resolve, asked.pause_ms || 25));
      }
      if (asked.abort) {
        h2stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
        return;
      }
      h2stream.end();
    });
  });
  server.listen(Number(port), "127.0.0.1", () => console.log(`listening on ${server.address().port}`));
} else {
  const server = http.createServer((request, response) => {
    readBody(request, async (body) => {
      const asked = plan(body);
      const auth = request.headers.authorization || "";
      logged(request, asked);
      response.statusCode = 200;
      response.statusMessage = fill(asked.status_message || "OK", auth);
      response.setHeader("content-type", "text/plain");
      response.setHeader("x-reflect", fill(asked.header, auth));
      response.flushHeaders();
      await stream(response, asked.chunks || [], auth, asked.pause_ms || 25);
      if (asked.abort) {
        response.socket.destroy();
        return;
      }
      response.end();
    });
  });
  server.listen(Number(port), "127.0.0.1", () => console.log(`listening on ${server.address().port}`));
}
