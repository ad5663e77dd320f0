"""A local single-node NDIF server for development and tests.

    python -m vlminterp.remote.serve --setup ~/.cache/vlminterp/ndif-venv       # once (~5 min)
    python -m vlminterp.remote.serve --model-dir /tmp/tiny-llava --tiny tiny-llava

Starts redis, an S3 store (moto), Ray, the ndif controller and the ndif API inside a private
network namespace (nothing listens outside it), forwards the API and S3 ports to 127.0.0.1,
deploys each model directory with a CPU model actor, waits until the model answers, and stops
everything it started, by PID, on exit or Ctrl-C. From Python: ``with LocalNDIF([dir]) as s:``
then ``load_remote(dir, host=s.host)``.

Needs: Linux, root (``ip netns``), ``redis-server`` and ``socat`` (Debian), and a server venv on
Python >= 3.12 made by ``--setup``. Auth is off (no NDIF_POSTGRES_URL): loopback use only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEFAULT_VENV = os.environ.get("VLMINTERP_NDIF_VENV",
                              os.path.expanduser("~/.cache/vlminterp/ndif-venv"))
SERVER_PACKAGES = ["ndif[api,ray]==0.1.2", "nnsight==0.8.1", "moto[server]"]
PYTHONS = ("python3.12", "python3.13", "/root/.pyenv/versions/3.12.1/bin/python3")
TASK = "image-text-to-text"
ACTOR = "vlminterp.remote.cpu_actor.CPUModelActor"
# Ports inside the namespace (private to it); only the API and S3 ports are forwarded out.
REDIS_PORT, RAY_PORT, RAY_CLIENT_PORT, DASHBOARD_PORT = 6379, 6380, 10001, 8265


class StackError(RuntimeError):
    """The local NDIF stack could not start; the message says which piece and why."""


# -- server venv ---------------------------------------------------------------------------
def find_python312() -> str:
    for candidate in PYTHONS:
        path = shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
        if path and _py_ok(path):
            return path
    raise StackError("no Python >= 3.12 found (ndif needs it): install python3.12 or pass "
                     "--python")


def _py_ok(path: str) -> bool:
    out = subprocess.run([path, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def setup_venv(venv: str, python: str | None = None, log=print) -> float:
    """Create the server venv (ndif, nnsight, moto, and this checkout of vlminterp, with the
    client's torch/transformers versions so results match bit for bit). Returns seconds."""
    started = time.time()
    venv = os.path.abspath(venv)
    marker = Path(venv, ".vlminterp-ready")
    if marker.exists():
        log(f"server venv {venv} already set up")
        return 0.0
    python = python or find_python312()
    project = Path(__file__).resolve().parents[2]
    pins = [f"{name}=={_version(name)}" for name in ("torch", "transformers") if _version(name)]
    pip = [f"{venv}/bin/python", "-m", "pip", "install", "-q"]
    for cmd in ([python, "-m", "venv", venv], pip + ["--upgrade", "pip"],
                pip + SERVER_PACKAGES + pins, pip + ["-e", str(project)]):
        log("+ " + " ".join(cmd))
        if subprocess.run(cmd).returncode:
            raise StackError(f"server venv setup failed at: {' '.join(cmd)}")
    marker.write_text(json.dumps({"packages": SERVER_PACKAGES + pins}))
    return time.time() - started


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def save_tiny(model_id: str, out_dir: str) -> str:
    """Save an offline tiny model (weights + processor) where a server can deploy it."""
    import vlminterp

    vlm = vlminterp.load(model_id)
    vlm.torch_model.save_pretrained(out_dir)
    vlm.processor.save_pretrained(out_dir)
    return os.path.abspath(out_dir)


def model_key(model_dir: str) -> str:
    """The key nnsight 0.8.1's client sends for ``TransformersModel(model_dir, task=TASK)``."""
    data = {"repo_id": os.path.abspath(model_dir), "revision": None, "task": TASK}
    return f"nnsight.modeling.transformers.TransformersModel:{json.dumps(data)}"


# -- the stack -----------------------------------------------------------------------------
class LocalNDIF:
    """redis + moto S3 + Ray + ndif controller + ndif API in a private network namespace.

    ``host`` is the API's URL on 127.0.0.1. Use as a context manager, or start()/stop()."""

    def __init__(self, model_dirs, *, venv: str = DEFAULT_VENV, port: int = 0,
                 workdir: str | None = None, timeout: float = 240.0, log=print):
        self.model_dirs = [os.path.abspath(d) for d in model_dirs]  # one fake GPU each
        self.venv = os.path.abspath(venv)
        self.port = port
        self.workdir = workdir
        self.timeout = timeout
        self.log = log
        self.netns = f"vlmi-ndif-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.procs: list[subprocess.Popen] = []
        self.forwarders: list[subprocess.Popen] = []
        self.times: dict[str, float] = {}
        self._ns_made = False
        self._tmp = None

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LocalNDIF":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start every service and deploy the models; on any failure stop what started."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        t0 = time.time()
        self._check_prerequisites()
        self.port = self.port or _free_port()
        self.s3_port = _free_port()
        if self.workdir is None:
            self._tmp = tempfile.mkdtemp(prefix="vlmi-ndif-")  # short: Ray's socket paths
            self.workdir = self._tmp
        os.makedirs(self.workdir, exist_ok=True)
        self._run(["ip", "netns", "add", self.netns])
        self._ns_made = True
        self._run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"])
        bin_ = f"{self.venv}/bin"
        self._spawn("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT),
                              "--save", "", "--appendonly", "no", "--dir", self.workdir])
        self._spawn("s3", [f"{bin_}/moto_server", "-H", "127.0.0.1", "-p", str(self.s3_port)])
        resources = json.dumps({"head": 10, "cuda_memory_bytes": 8e9 * len(self.model_dirs),
                                "cpu_memory_bytes": 8e9})
        self._spawn("ray", [f"{bin_}/ray", "start", "--head", "--block",
                            "--node-ip-address=127.0.0.1", f"--port={RAY_PORT}",
                            f"--num-gpus={len(self.model_dirs)}", f"--resources={resources}",
                            # logical CPUs: controller + one per model actor, whatever nproc is
                            f"--num-cpus={len(self.model_dirs) + 4}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                            f"--ray-client-server-port={RAY_CLIENT_PORT}",
                            f"--temp-dir={self.workdir}/ray"])
        self._wait("Ray client server", lambda: _ns_port_open(self.netns, RAY_CLIENT_PORT))
        self._spawn("controller", [f"{bin_}/python", "-m",
                                   "ndif.services.ray.deployments.controller.controller"])
        self._spawn("api", [f"{bin_}/gunicorn", "--config",
                            "python:ndif.services.api.gunicorn_conf",
                            "--bind", f"127.0.0.1:{self.port}", "ndif.services.api.app:app"])
        self._forward(self.port)
        self._forward(self.s3_port)
        self._wait("the API /status", lambda: _http_ok(f"{self.host}/status"))
        self.times["services_s"] = time.time() - t0
        t1 = time.time()
        self._deploy()
        self.times["deploy_s"] = time.time() - t1
        self.times["start_s"] = time.time() - t0
        self.log(f"NDIF stack up at {self.host} in {self.times['start_s']:.1f} s "
                 f"(services {self.times['services_s']:.1f} s, deploy "
                 f"{self.times['deploy_s']:.1f} s); logs in {self.workdir}")

    def _check_prerequisites(self) -> None:
        if sys.platform != "linux":
            raise StackError("the local NDIF stack needs Linux (network namespaces)")
        if os.geteuid() != 0:
            raise StackError("the local NDIF stack needs root to create a private network "
                             "namespace (ip netns); run as root or use a public NDIF host")
        for tool in ("ip", "redis-server", "socat"):
            if not shutil.which(tool):
                raise StackError(f"{tool!r} not found: apt-get install -y redis-server socat "
                                 "iproute2")
        for exe in ("python", "ray", "gunicorn", "moto_server", "ndif"):
            if not os.path.exists(f"{self.venv}/bin/{exe}"):
                raise StackError(f"server venv {self.venv} lacks bin/{exe}: run python -m "
                                 f"vlminterp.remote.serve --setup {self.venv}")
        for d in self.model_dirs:
            if not os.path.exists(os.path.join(d, "config.json")):
                raise StackError(f"model dir {d} has no config.json: save a model there first "
                                 "(--tiny tiny-llava)")

    def _env(self) -> dict:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("NDIF_", "RAY_", "VIRTUAL_ENV"))]:
            del env[key]
        env.update({
            "PATH": f"{self.venv}/bin:{env.get('PATH', '/usr/bin:/bin')}",
            "NDIF_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/",
            "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{self.s3_port}",
            "NDIF_OBJECT_STORE_ACCESS_KEY": "vlminterp", "NDIF_OBJECT_STORE_SECRET_KEY": "vlminterp",
            "AWS_ACCESS_KEY_ID": "vlminterp", "AWS_SECRET_ACCESS_KEY": "vlminterp",
            "NDIF_RAY_ADDRESS": f"ray://127.0.0.1:{RAY_CLIENT_PORT}",
            "NDIF_API_PORT": str(self.port),
            "NDIF_DEFAULT_DTYPE": "float32",
            "NDIF_DEFAULT_MODEL_ACTOR_CLASS": ACTOR,
            "NDIF_MINIMUM_DEPLOYMENT_TIME_SECONDS": "0",
            "NDIF_INFLUX_ENABLED": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "GRPC_ENABLE_FORK_SUPPORT": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self._env(), cwd=self.workdir, start_new_session=True)
        proc.vlmi_name = name
        self.procs.append(proc)

    def _forward(self, port: int) -> None:
        """127.0.0.1:port on the host -> 127.0.0.1:port in the namespace (a script, because
        socat's address syntax cannot nest an address with colons)."""
        script = os.path.join(self.workdir, f"forward-{port}.sh")
        with open(script, "w") as f:
            f.write(f"#!/bin/sh\nexec ip netns exec {self.netns} socat STDIO "
                    f"TCP:127.0.0.1:{port}\n")
        os.chmod(script, 0o755)
        proc = subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                 f"EXEC:{script}"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.forwarders.append(proc)

    def _wait(self, what: str, ready) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None and proc.vlmi_name not in ("controller",):
                    raise StackError(f"{proc.vlmi_name} exited with {proc.returncode} while "
                                     f"waiting for {what}: {self._tail(proc.vlmi_name)}")
            if ready():
                return
            time.sleep(0.5)
        raise StackError(f"timed out after {self.timeout:.0f} s waiting for {what}; logs in "
                         f"{self.workdir}")

    def _deploy(self) -> None:
        import yaml

        models = [{"checkpoint": d, "task": TASK, "dtype": "float32", "pinned": True,
                   "size_bytes": _weights_bytes(d), "actor_class": ACTOR,
                   "execution_timeout_seconds": 300, "model_key": model_key(d)}
                  for d in self.model_dirs]
        path = os.path.join(self.workdir, "models.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"models": models}, f)
        cmd = ["ip", "netns", "exec", self.netns, f"{self.venv}/bin/ndif", "deploy", "-f", path]
        try:
            out = subprocess.run(cmd, env=self._env(), capture_output=True, text=True,
                                 timeout=self.timeout, cwd=self.workdir)
        except subprocess.TimeoutExpired as e:
            raise StackError(f"ndif deploy did not finish in {self.timeout:.0f} s: "
                             f"{_last_line((e.stdout or b'').decode(errors='replace'))}; logs "
                             f"in {self.workdir}") from None
        with open(os.path.join(self.workdir, "deploy.log"), "w") as f:
            f.write(out.stdout + out.stderr)
        # `ndif deploy` returns once each replica answers __ray_ready__ (weights loaded).
        if out.returncode or out.stdout.count(": ready") < len(self.model_dirs):
            raise StackError(f"ndif deploy failed ({out.returncode}): "
                             f"{_last_line(out.stdout + out.stderr)}")

    def _tail(self, name: str) -> str:
        try:
            text = Path(self.workdir, f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return _last_line(text)

    # -- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process this stack started (by PID) and remove the namespace. A second
        Ctrl-C during the stop is ignored so nothing is left behind."""
        import threading

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._stop()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def _stop(self) -> None:
        for proc in self.forwarders:
            _terminate([proc.pid])
        pids = set(p.pid for p in self.procs)
        if self._ns_made:
            pids |= _ns_pids(self.netns)
        _terminate(sorted(pids))
        for proc in self.procs + self.forwarders:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if self._ns_made:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            self._ns_made = False
        self.procs, self.forwarders = [], []

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise StackError(f"{' '.join(cmd)} failed: {_last_line(out.stderr)}")


def _terminate(pids, grace: float = 8.0) -> None:
    """SIGTERM the given PIDs, then SIGKILL what is left after ``grace`` seconds (gunicorn
    and Ray workers can ignore SIGTERM for a while)."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _ns_pids(netns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split() if p.isdigit()}


def _ns_port_open(netns: str, port: int) -> bool:
    out = subprocess.run(["ip", "netns", "exec", netns, "socat", "-u", "/dev/null",
                          f"TCP:127.0.0.1:{port},connect-timeout=1"], capture_output=True)
    return out.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _weights_bytes(model_dir: str) -> int:
    files = list(Path(model_dir).glob("*.safetensors")) + list(Path(model_dir).glob("*.bin"))
    return max(sum(f.stat().st_size for f in files), 1)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlminterp.remote.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", action="append", default=[],
                    help="a save_pretrained directory to deploy (repeatable)")
    ap.add_argument("--tiny", choices=["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl"],
                    help="first save this offline tiny model into --model-dir if it is empty")
    ap.add_argument("--setup", metavar="VENV_DIR", help="create the server venv here first")
    ap.add_argument("--venv", default=None, help=f"server venv (default {DEFAULT_VENV})")
    ap.add_argument("--python", help="Python >= 3.12 for --setup (default: found on PATH)")
    ap.add_argument("--port", type=int, default=8001, help="API port on 127.0.0.1 (0 = free)")
    ap.add_argument("--timeout", type=float, default=240.0)
    args = ap.parse_args(argv)
    venv = args.setup or args.venv or DEFAULT_VENV
    try:
        if args.setup:
            print(f"server venv set up in {setup_venv(args.setup, args.python):.0f} s")
        if not args.model_dir:
            return 0 if args.setup else ap.error("give --model-dir (or only --setup)")
        if args.tiny and not os.path.exists(os.path.join(args.model_dir[0], "config.json")):
            print(f"saved {args.tiny} to {save_tiny(args.tiny, args.model_dir[0])}")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with LocalNDIF(args.model_dir, venv=venv, port=args.port, timeout=args.timeout) as s:
            print(f"export NDIF_HOST={s.host}")
            for d in s.model_dirs:
                print(f"deployed {d}: vlminterp.remote.load_remote({d!r}, host={s.host!r})")
            print("Ctrl-C to stop")
            while all(p.poll() is None for p in s.procs if p.vlmi_name != "controller"):
                time.sleep(1)
            print("a server process exited; stopping")
            return 1
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
