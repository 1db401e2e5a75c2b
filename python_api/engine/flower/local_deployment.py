"""A loopback federation for trying the deployment runtime on one machine (and for the test):
one `flower-superlink` and N `flower-supernode` processes on 127.0.0.1, TLS off (loopback only),
then `flwr run` of the app in python_api/engine/flower/app. Every process started here is stopped by
its PID (process group) when the context exits.

    with LocalFederation(num_supernodes=2, workdir=tmp) as fed:
        fed.run({"method": "glfc", "config": "glfc-demo", "out": str(tmp / "run")}, timeout_s=300)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["LocalFederation", "APP_DIR", "free_port"]

APP_DIR = Path(__file__).resolve().parent / "app"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalFederation:
    def __init__(self, num_supernodes: int = 2, workdir=None, node_configs: Optional[list] = None,
                 python_path: Optional[str] = None, start_timeout_s: float = 60.0):
        import tempfile
        self.num_supernodes = num_supernodes
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fcl-flower-fed-"))
        self.node_configs = node_configs or [f"partition-id={i} num-partitions={num_supernodes}"
                                             for i in range(num_supernodes)]
        self.start_timeout_s = start_timeout_s
        self.bin = Path(sys.executable).parent
        root = str(Path(__file__).resolve().parents[3])      # the tree python_api comes from
        self.env = dict(os.environ)
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"   # SuperLink starts flower-superexec by name
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path or root, self.env.get("PYTHONPATH")) if p)
        self.env["FLWR_HOME"] = str(self.workdir / "flwr-home")
        self.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        self.port = free_port()
        self.processes: list = []          # (name, Popen)

    # ---------------------------------------------------------------- processes
    def _start(self, name: str, args: list) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                start_new_session=True)   # own process group: its children stop with it
        self.processes.append((name, proc))
        return proc

    def _wait_port(self, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex((LOOPBACK, port)) == 0:
                    return
            for name, proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.workdir / (name + '.log')}")
            time.sleep(0.2)
        raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {self.start_timeout_s} s")

    def start(self) -> "LocalFederation":
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{LOOPBACK}:{self.port}"\ninsecure = true\n')
        self._start("superlink", [str(self.bin / "flower-superlink"), "--insecure", "--host", LOOPBACK,
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        self._wait_port(self.port)
        ports = []
        for i, node_config in enumerate(self.node_configs):
            ports.append(free_port())
            # (SuperNodes install no app dependencies unless --allow-runtime-dependency-installation)
            self._start(f"supernode{i}", [str(self.bin / "flower-supernode"), "--insecure",
                                          "--superlink", f"{LOOPBACK}:{self.port}", "--host", LOOPBACK,
                                          "--port", str(ports[-1]), "--node-config", node_config])
        for port in ports:
            self._wait_port(port)
        return self

    def stop(self) -> None:
        for name, proc in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)   # the group led by the PID we started
                except ProcessLookupError:
                    pass
        for name, proc in reversed(self.processes):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- runs
    def run(self, run_config: dict, timeout_s: float = 600.0, app_dir=None) -> subprocess.CompletedProcess:
        """`flwr run <app> local --run-config ... --stream`: returns when the run ended (or timeout)."""
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        args = [str(self.bin / "flwr"), "run", str(app_dir or APP_DIR), "local", "--run-config", overrides, "--stream"]
        return subprocess.run(args, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout_s)

    def logs(self) -> str:
        out = []
        for name, _ in self.processes:
            path = self.workdir / f"{name}.log"
            if path.exists():
                out.append(f"==== {name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(out)
