"""`LocalServer`: a threaded HTTP server on 127.0.0.1 (a free port) for the tests' stand-in
servers (`fault_server.FaultServer`, `scripted_teacher_server.ScriptedTeacherServer`).

A subclass returns its request handler from `handler()` (a `BaseHTTPRequestHandler`, which
reaches the server object as `self.owner`) and sets `url_path` (appended to
http://127.0.0.1:PORT in `url`) and `thread_name`:

    with ScriptedTeacherServer() as s:   # start() ... close()
      s.url                              # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import http.server
import threading


class LocalServer:
  url_path = ""
  thread_name = "local-server"
  _httpd: http.server.ThreadingHTTPServer | None = None
  _thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    assert self._httpd is not None, "start() the server first"
    host, port = self._httpd.server_address[:2]
    return f"http://{host}:{port}{self.url_path}"

  def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
    raise NotImplementedError

  def start(self):
    handler = type("Handler", (self.handler(),), {"owner": self})
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self._httpd.daemon_threads = True
    self._httpd.block_on_close = False
    self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True,
                                    name=self.thread_name)
    self._thread.start()
    return self

  def close(self) -> None:
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()
      self._thread.join(timeout=5)
      self._httpd = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()
