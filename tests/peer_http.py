"""A tiny HTTP server for network tests and smoke scenarios: it answers every GET with
the address it saw the request come from (is the client NATed, and as whom?).

    python3 tests/peer_http.py ADDRESS [PORT]      # default port 8080; runs until killed
"""

from __future__ import annotations

import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


if __name__ == "__main__":
    http.server.HTTPServer((sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8080), Handler).serve_forever()
