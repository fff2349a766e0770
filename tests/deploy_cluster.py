"""A real Flower deployment on 127.0.0.1 for tests: SuperLink, SuperNodes, `flwr run`.

Every process is started in its own session with its output in a log file, remembered
with its start time, and stopped by PID (its descendants too: the SuperExec each Flower
process starts, and the ``flwr-serverapp``/``flwr-clientapp`` processes those start), so
nothing outlives a test, also when it fails. TLS certificates and SuperNode
authentication keys are generated here with ``cryptography`` (a Flower dependency).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
#: SuperExec task polling (Flower's default 1 s): shorter, so a message waits less.
SUPEREXEC_POLL_S = "0.2"
#: How long a stopped process may take to exit after SIGTERM before it gets SIGKILL.
STOP_GRACE_S = 15.0
#: How long a SuperLink or SuperNode may take to open its port.
START_TIMEOUT_S = 90.0
CERT_DAYS = 2  # test certificates outlive any test run
CERT_KEY_BITS = 2048  # RSA key size of the test CA and server certificate


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- processes
def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (read from /proc)."""
    tree, found, stack = _children(), [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@dataclass
class Started:
    """A process this module started (or found below one), known by PID and start time."""

    pid: int
    ticks: int | None
    name: str

    def alive(self) -> bool:
        """True while the same process (same PID and start time) exists and is not a zombie."""
        if self.ticks is None or _start_ticks(self.pid) != self.ticks:
            return False
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process is still the one started."""
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def stop_all(roots: list[subprocess.Popen], names: list[str]) -> None:
    """SIGTERM every root and its descendants, wait, SIGKILL what is left, reap the roots."""
    everyone = []
    for proc, name in zip(roots, names):
        everyone.append(Started(proc.pid, _start_ticks(proc.pid), name))
        everyone += [Started(p, _start_ticks(p), f"{name} child") for p in descendants(proc.pid)]
    for process in everyone:
        process.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(p.alive() for p in everyone):
        for proc in roots:
            proc.poll()  # reap exited roots so they stop counting as alive
        time.sleep(0.2)
    for process in everyone:
        process.signal(signal.SIGKILL)
    for proc in roots:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}:\n{tail(log)}")
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open within {timeout_s} s:\n{tail(log)}")


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file (for failure messages)."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


# --------------------------------------------------------------------------- security material
@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Generate a throw-away CA and a server certificate valid for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERT_DAYS))

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=CERT_KEY_BITS)

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key, server_key = key(), key()
    ca = (
        x509.CertificateBuilder().subject_name(name("edgecloud test CA")).issuer_name(name("edgecloud test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
    server = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return files


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format): (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    private.chmod(0o600)
    return private, public


# --------------------------------------------------------------------------- the deployment
@dataclass
class Deployment:
    """A SuperLink and its SuperNodes on 127.0.0.1, each with its own FLWR_HOME and log.

    Use as a context manager (or call :meth:`stop`): every process it started is stopped.
    """

    folder: Path
    tls: TlsFiles | None = None
    node_auth: bool = False
    port: int = field(default_factory=free_port)
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    _roots: list[subprocess.Popen] = field(default_factory=list)
    _names: list[str] = field(default_factory=list)

    CONNECTION = "edgecloud-deploy"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ environment
    def env(self, home: Path) -> dict[str, str]:
        """The environment of a Flower process whose FLWR_HOME is ``home`` (offline switches on)."""
        home.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_S,
            "OMP_NUM_THREADS": "1",
        }

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the `flwr` CLI, whose config.toml names this deployment's SuperLink."""
        home = self.folder / "cli-home"
        if not (home / "config.toml").exists():
            home.mkdir(parents=True, exist_ok=True)  # parents: the deployment's folder too
            security = f'root-certificates = "{self.tls.ca_cert}"' if self.tls else "insecure = true"
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "{self.CONNECTION}"\n\n'
                f'[superlink.{self.CONNECTION}]\naddress = "{LOOPBACK}:{self.port}"\n{security}\n'
            )
        return home

    def _spawn(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env(home), cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._roots.append(proc)
        self._names.append(name)
        return proc

    # ------------------------------------------------------------------ processes
    def start_superlink(self) -> None:
        """Start the SuperLink (no --simulation: the deployment runtime) and wait for its port."""
        security = (
            ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
             "--ssl-keyfile", str(self.tls.server_key)]
            if self.tls else ["--insecure"]
        )
        auth = ["--enable-supernode-auth"] if self.node_auth else []
        cmd = [str(BIN / "flower-superlink"), *security, *auth, "--isolation", "subprocess",
               "--disable-runtime-dependency-installation", "--host", LOOPBACK, "--port", str(self.port)]
        proc = self._spawn("superlink", cmd, self.folder / "superlink-home")
        wait_for_port(self.port, proc, self.folder / "superlink.log")

    def register_node(self, public_key: Path) -> None:
        """``flwr supernode register``: let a SuperNode with this key in (node authentication)."""
        done = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(public_key), self.CONNECTION],
            env=self.env(self.cli_home), cwd=self.folder, capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed:\n{done.stdout}\n{done.stderr}")

    def start_supernode(self, partition_id: int, num_partitions: int, node_config: str = "",
                        private_key: Path | None = None, wait: bool = True) -> subprocess.Popen:
        """Start a SuperNode holding partition ``partition_id``; wait for its Runtime API port.

        With ``wait`` False it returns at once (for a SuperNode expected to be refused).
        """
        runtime_port = free_port()
        security = ["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"]
        auth = ["--auth-supernode-private-key", str(private_key)] if private_key else []
        config = f"partition-id={partition_id} num-partitions={num_partitions} {node_config}".strip()
        cmd = [str(BIN / "flower-supernode"), *security, *auth, "--superlink", f"{LOOPBACK}:{self.port}",
               "--host", LOOPBACK, "--port", str(runtime_port), "--node-config", config]
        name = f"supernode-{partition_id}"
        proc = self._spawn(name, cmd, self.folder / f"{name}-home")
        if wait:
            wait_for_port(runtime_port, proc, self.folder / f"{name}.log")
        self.nodes[partition_id] = proc
        return proc

    def run(self, run_config: str, timeout_s: float) -> subprocess.CompletedProcess:
        """``flwr run . <this deployment> --stream --run-config ...`` from the project root."""
        return subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), self.CONNECTION, "--stream", "--run-config", run_config],
            env=self.env(self.cli_home), cwd=self.folder, capture_output=True, text=True, timeout=timeout_s,
        )

    def node_log(self, partition_id: int) -> str:
        """Everything a SuperNode and its ClientApp processes printed."""
        return (self.folder / f"supernode-{partition_id}.log").read_text(errors="replace")

    def logs(self) -> str:
        """The end of every log, for a failure message."""
        return "\n".join(f"--- {name}\n{tail(self.folder / f'{name}.log', 1500)}" for name in self._names)

    def stop(self) -> None:
        """Stop every process this deployment started, by PID (descendants included)."""
        stop_all(self._roots, self._names)
