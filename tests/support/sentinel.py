"""A real Sentinel deployment on loopback: a master, a replica and three sentinels.

All are `redis-server` processes with their files in one folder. The sentinels' failure
detection is Redis's own (`down-after-milliseconds`, `failover-timeout`), made short so a
failover takes seconds; nothing in the project under test is told about it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from support.redis_server import PASSWORD, find_redis_server, free_port

MASTER_NAME = "vq-master"
SENTINEL_PASSWORD = "sentinel-pass-91c2"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class _Process:
    def __init__(self, args: list[str], workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args,
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


class SentinelCluster:
    """Servers by port (the master first), `sentinel_ports`; `url` is the sentinel URL."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.first_master_port = free_port()
        self.first_replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.servers: dict[int, _Process] = {}
        self.sentinels: list[_Process] = []

    @property
    def url(self) -> str:
        first, *others = self.sentinel_ports
        rest = "".join(f";sentinel://127.0.0.1:{port}" for port in others)
        return f"sentinel://:{PASSWORD}@127.0.0.1:{first}/0{rest}"

    def env(self) -> dict[str, str]:
        """What a worker or client process needs to reach the master through the sentinels."""
        return {
            "REDIS_URL": self.url,
            "VQ_REDIS_SENTINEL_MASTER": MASTER_NAME,
            "VQ_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        }

    def start(self, timeout_s: float = 30) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_server(self.first_master_port)
        self._start_server(
            self.first_replica_port, "--replicaof", "127.0.0.1", str(self.first_master_port)
        )
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.workdir}\n"
                f"logfile {self.workdir / f'sentinel-{port}.log'}\n"
                f"requirepass {SENTINEL_PASSWORD}\n"
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.first_master_port} 2\n"
                f"sentinel auth-pass {MASTER_NAME} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            sentinel = _Process([find_redis_server(), str(conf), "--sentinel"], self.workdir)
            sentinel.start()
            self.sentinels.append(sentinel)
        self._wait_until_watched(timeout_s)

    def _start_server(self, port: int, *extra: str) -> None:
        server = _Process(
            [
                find_redis_server(),
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--requirepass", PASSWORD,
                "--masterauth", PASSWORD,
                "--dir", str(self.workdir),
                "--dbfilename", f"dump-{port}.rdb",
                "--appendonly", "no",
                "--save", "",
                "--maxmemory-policy", "noeviction",
                "--logfile", str(self.workdir / f"redis-{port}.log"),
                *extra,
            ],
            self.workdir,
        )  # fmt: skip
        server.start()
        self.servers[port] = server

    def server(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=5)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=port, password=SENTINEL_PASSWORD, socket_timeout=5
        )

    def master_address(self) -> tuple[str, int] | None:
        """The master as the first sentinel that answers sees it."""
        for port in self.sentinel_ports:
            try:
                reply = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except (redis.RedisError, OSError):
                continue
            if reply:
                host, master_port = reply
                return (host.decode() if isinstance(host, bytes) else host, int(master_port))
        return None

    def _wait_until_watched(self, timeout_s: float) -> None:
        """Until the replica is in sync and every sentinel knows the replica and the others."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._settled():
                return
            time.sleep(0.1)
        raise RuntimeError(f"sentinel deployment did not settle (logs in {self.workdir})")

    def _settled(self) -> bool:
        try:
            info = self.server(self.first_replica_port).info("replication")
            if info.get("master_link_status") != "up":
                return False
            for port in self.sentinel_ports:
                state = self.sentinel(port).sentinel_master(MASTER_NAME)
                if int(state.get("num-slaves", 0)) < 1:
                    return False
                if int(state.get("num-other-sentinels", 0)) < 2:
                    return False
        except (redis.RedisError, OSError, ValueError):
            return False
        return True

    def master_port(self) -> int:
        address = self.master_address()
        assert address is not None, f"no sentinel answers (logs in {self.workdir})"
        return address[1]

    def ensure_replica(self, timeout_s: float = 60) -> None:
        """A server killed by an earlier test comes back as a replica of the current master;
        returns once it is in sync and the sentinels count it as a healthy replica."""
        master = self.master_port()
        for port, server in list(self.servers.items()):
            if server.process is None or server.process.poll() is not None:
                self._start_server(port, "--replicaof", "127.0.0.1", str(master))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._replica_ready(master):
                return
            time.sleep(0.1)
        raise RuntimeError(f"no replica in sync after {timeout_s}s (logs in {self.workdir})")

    def _replica_ready(self, master: int) -> bool:
        try:
            if self.server(master).info("replication").get("connected_slaves", 0) < 1:
                return False
            for port in self.sentinel_ports:
                replicas = self.sentinel(port).sentinel_slaves(MASTER_NAME)
                healthy = [
                    r
                    for r in replicas
                    if r.get("is_slave") and not r.get("is_sdown") and not r.get("is_odown")
                    and r.get("master-link-status") == "ok"
                ]
                if not healthy:
                    return False
        except (redis.RedisError, OSError):
            return False
        return True

    def wait_replicated(self, timeout_ms: int = 10000) -> int:
        """WAIT on the master until the replica acknowledged every write so far."""
        return int(self.server(self.master_port()).execute_command("WAIT", 1, timeout_ms))

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        self.servers[port].stop(signal.SIGKILL)
        return port

    def planned_failover(self) -> int:
        """`SENTINEL FAILOVER`: the replica is promoted and the master, alive, demoted (the
        sentinels kill its clients' connections). Returns the old master's port."""
        port = self.master_port()
        self.sentinel(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        return port

    def wait_for_new_master(self, old_port: int, timeout_s: float = 60) -> tuple[str, int]:
        """Until the sentinels name another server as master and it accepts writes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            address = self.master_address()
            if address is not None and address[1] != old_port:
                try:
                    role = self.server(address[1]).execute_command("ROLE")
                    if role[0] in (b"master", "master"):
                        return address
                except (redis.RedisError, OSError):
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"no failover after {timeout_s}s (logs in {self.workdir})")

    def wait_switched(self, new_port: int, timeout_s: float = 60) -> None:
        """Until a sentinel's own record of the master (`SENTINEL MASTER`, what clients
        connecting through the sentinels read) names the server on `new_port`. It lags the
        promotion: until the sentinels switch, new connections still reach the old master."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for port in self.sentinel_ports:
                try:
                    if int(self.sentinel(port).sentinel_master(MASTER_NAME)["port"]) == new_port:
                        return
                except (redis.RedisError, OSError, KeyError):
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"the sentinels never switched to {new_port} after {timeout_s}s")

    def wait_demoted(self, port: int, timeout_s: float = 60) -> None:
        """Until the server on `port` (a master a planned failover replaced) is a replica."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.server(port).execute_command("ROLE")[0] in (b"slave", "slave"):
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{port} still not a replica after {timeout_s}s")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers.values():
            server.stop()

    def __enter__(self) -> SentinelCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
