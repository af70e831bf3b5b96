// A minimal Lambda runtime interface loop for Node.js (what the managed nodejs runtime does,
// without its logging and X-Ray plumbing): load the handler module, then forever GET the next
// invocation from AWS_LAMBDA_RUNTIME_API, run the handler, POST its result (or its error).
// The official client (npm aws-lambda-ric) compiles native code at install time, so the
// benchmark uses this loop; it adds no dependency.
import http from "node:http";

const api = process.env.AWS_LAMBDA_RUNTIME_API;
const base = "/2018-06-01/runtime";
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function request(method, path, body) {
  return new Promise((resolve, reject) => {
    const [host, port] = api.split(":");
    const req = http.request(
      { host, port, path: base + path, method, agent,
        headers: body === undefined ? {} : { "content-type": "application/json" } },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ headers: res.headers, body: Buffer.concat(chunks).toString() }));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

let handler;
try {
  ({ handler } = await import(process.env.HANDLER_MODULE ?? "./index.mjs"));
} catch (err) {
  await request("POST", "/init/error", JSON.stringify({ errorType: err.name, errorMessage: err.message }));
  process.exit(1);
}
for (;;) {
  const next = await request("GET", "/invocation/next");
  const id = next.headers["lambda-runtime-aws-request-id"];
  try {
    const result = await handler(JSON.parse(next.body), { awsRequestId: id });
    await request("POST", `/invocation/${id}/response`, JSON.stringify(result ?? null));
  } catch (err) {
    await request("POST", `/invocation/${id}/error`, JSON.stringify({ errorType: err.name, errorMessage: err.message }));
  }
}
