"""Which docker engine a new sandbox starts on, when `config.env.docker_hosts` lists several.

Many concurrent episodes need more containers than one machine holds, so the docker sandbox
talks to any engine the docker SDK reaches (`DockerClient(base_url=...)`):

    unix:///var/run/docker.sock     this machine's engine
    tcp://10.0.0.3:2376             a remote engine's API (TLS from DOCKER_TLS_VERIFY /
                                    DOCKER_CERT_PATH, as the docker CLI reads them)
    ssh://user@box2                 a remote engine through `ssh user@box2 docker system
                                    dial-stdio` (the system `ssh`, its keys, agent and config)

Each new sandbox goes to the engine with the fewest live sandboxes of this process, ties broken
round-robin, and gives its slot back when it closes (`lease` / `Lease.release`). The counts are
this process's only: on a pod every worker spreads its own episodes over the list it is given,
so with the same list everywhere the engines' loads are even in expectation.

    >>> pool = EnginePool(("unix:///a.sock", "ssh://b"))
    >>> [pool.acquire() for _ in range(3)]
    ['unix:///a.sock', 'ssh://b', 'unix:///a.sock']
    >>> pool.release("ssh://b"); pool.acquire()   # a has 2 live, b none
    'ssh://b'
"""

from __future__ import annotations

import threading
from typing import Sequence


class EnginePool:
  """Live-sandbox counts per engine; `acquire` picks the least loaded (round-robin on ties)."""

  def __init__(self, hosts: Sequence[str]):
    if not hosts:
      raise ValueError("EnginePool needs at least one docker host")
    self.hosts = tuple(hosts)
    self.live = {h: 0 for h in self.hosts}
    self.started = {h: 0 for h in self.hosts}  # sandboxes ever placed there (for reports)
    self._next = 0
    self._lock = threading.Lock()

  def acquire(self) -> str:
    with self._lock:
      n = len(self.hosts)
      order = [self.hosts[(self._next + i) % n] for i in range(n)]
      host = min(order, key=lambda h: self.live[h])  # first of the least loaded, from _next on
      self._next = (self.hosts.index(host) + 1) % n
      self.live[host] += 1
      self.started[host] += 1
      return host

  def release(self, host: str) -> None:
    with self._lock:
      self.live[host] = max(0, self.live[host] - 1)


_POOLS: dict[tuple[str, ...], EnginePool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(hosts: Sequence[str]) -> EnginePool:
  """The process-wide pool of this list of engines (one per distinct list)."""
  key = tuple(hosts)
  with _POOLS_LOCK:
    if key not in _POOLS:
      _POOLS[key] = EnginePool(key)
    return _POOLS[key]
