// The benchmark's origin server (scripts/bench): fast enough that the candidate in the
// middle, not the server, is what gets measured. Node is used because the lab's Python
// servers log every request and would cap throughput below the proxy's.
//   node bench_origin.js CERT KEY ADDRESS PORT
// Routes: /small (a short body), /bytes/N (N bytes, streamed), /sse (one event at once,
// then three more 50 ms apart).
"use strict";
const https = require("https");
const fs = require("fs");
const [cert, key, address, port] = process.argv.slice(2);
const chunk = Buffer.alloc(64 * 1024, 0x61);
const small = Buffer.from("ok ".repeat(20) + "\n");

const server = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) },
  (req, res) => {
    const url = req.url.split("?")[0];
    let m;
    if (url === "/small") {
      res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": small.length });
      res.end(small);
    } else if ((m = url.match(/^\/bytes\/(\d{1,12})$/))) {
      let left = Number(m[1]);
      res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": left });
      const pump = () => {
        while (left > 0) {
          const n = Math.min(left, chunk.length);
          left -= n;
          if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
            res.once("drain", pump);
            return;
          }
        }
        res.end();
      };
      pump();
    } else if (url === "/sse") {
      res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
      let n = 0;
      const send = () => {
        res.write(`data: event ${n}\n\n`);
        if (++n < 4) setTimeout(send, 50); else res.end();
      };
      send();
    } else {
      res.writeHead(404, { "Content-Length": 0 });
      res.end();
    }
  });
server.keepAliveTimeout = 60000;
server.listen(Number(port), address, () => process.stdout.write("READY\n"));
