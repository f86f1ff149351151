"""What a site installs: the systemd unit (checked by systemd itself), the system user,
and the Dockerfile and compose file (checked against the configuration's defaults;
building the image needs a Docker daemon, which the test machine does not have)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from dicomrouter.config.models import RouterConfig
from tests.support import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "packaging" / "dicomrouter.service"
SYSUSERS = ROOT / "packaging" / "dicomrouter.sysusers"
INSTALLED = "/opt/dicomrouter/bin/dicomrouter"
DEFAULTS = RouterConfig()


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    skip_or_fail("" if path else f"{name} not installed (apt-get install systemd)", "packaging")
    assert path
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on ``text`` with the ExecStart binary pointing at one
    that exists here (verify refuses a missing one); returns the result with only
    the lines about this unit in stderr (verify also reports on the host's units)."""
    fake = tmp_path / "bin" / "dicomrouter"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = tmp_path / "dicomrouter.service"
    unit.write_text(text.replace(INSTALLED, str(fake)))
    result = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if unit.name in line)
    return result


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert INSTALLED in text
    result = verify(tmp_path / "good", text)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The check has teeth: a misspelt key, a bad value, a missing binary.
    typo = verify(tmp_path / "typo", text.replace("ProtectSystem=", "ProtectSystm="))
    assert "Unknown key 'ProtectSystm'" in typo.stderr
    value = verify(
        tmp_path / "value", text.replace("ProtectSystem=strict", "ProtectSystem=stricter")
    )
    assert "Failed to parse" in value.stderr and "stricter" in value.stderr
    missing = tmp_path / "missing" / "dicomrouter.service"
    missing.parent.mkdir()
    missing.write_text(text.replace(INSTALLED, str(tmp_path / "nowhere")))
    absent = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", str(missing)], capture_output=True, text=True
    )
    assert absent.returncode != 0 and "not executable" in absent.stderr


def test_the_systemd_unit_is_sandboxed_and_reloads_with_sighup(tmp_path: Path) -> None:
    settings = unit_settings(UNIT.read_text())
    one = {key: values[-1] for key, values in settings.items()}
    assert one["ExecStart"] == f"{INSTALLED} serve --config /etc/dicomrouter/dicomrouter.yaml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["User"] == "dicomrouter" and one["StateDirectory"] == "dicomrouter"
    assert one["KillMode"] == "mixed"  # SIGTERM to the node only: it stops its children
    assert one["RestartPreventExitStatus"] == "2"  # what `serve` exits with on a bad file
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert one[key] == value, key
    # The config folder stays writable: PUT /api/v1/config replaces the file.
    assert one["ReadWritePaths"] == "-/etc/dicomrouter"  # "-": a missing folder is no error
    # systemd's own exposure score (0 best, 10 worst) stays low.
    unit = tmp_path / "dicomrouter.service"
    fake = tmp_path / "dicomrouter"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(fake)))
    security = subprocess.run(
        [systemd_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=25",
         str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    assert "Overall exposure level for dicomrouter.service" in security.stdout


def test_the_sysusers_file_creates_the_units_user(tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_tool("systemd-sysusers"), f"--root={tmp_path}", "--dry-run", str(SYSUSERS)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Creating user 'dicomrouter'" in result.stdout + result.stderr
    assert not (tmp_path / "etc" / "passwd").exists()  # a dry run


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> arguments, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word.upper(), []).append(" ".join(rest.split()))
    return instructions


def test_the_dockerfile_matches_the_configuration_defaults() -> None:
    docker = dockerfile()
    assert docker["FROM"] == ["debian:12-slim"]
    ports = {int(p) for p in docker["EXPOSE"][0].split()}
    assert ports == {DEFAULTS.dicom.port, DEFAULTS.http.port}
    (volume,) = docker["VOLUME"]
    assert f"DICOMROUTER_STORAGE__PATH={volume}" in " ".join(docker["ENV"])
    assert docker["USER"] == ["dicomrouter"]
    assert docker["ENTRYPOINT"] == ['["dicomrouter"]'] and docker["CMD"] == ['["serve"]']
    # The health check asks a route the HTTP service has, on its default port.
    (health,) = docker["HEALTHCHECK"]
    from dicomrouter.api.health import router

    paths = {route.path for route in router.routes}  # type: ignore[attr-defined]
    url = re.search(r"http://127\.0\.0\.1:%s(/\w+)", health)
    assert url and url[1] in paths
    assert f"'{DEFAULTS.http.port}'" in health
    # The dockerignore lets in what `pip install` of the project needs.
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "src/"):
        assert f"!{needed}" in ignore


def test_the_compose_file_matches_the_dockerfile() -> None:
    docker = dockerfile()
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    router = compose["services"]["router"]
    assert router["build"] == "."
    published = {tuple(int(p) for p in mapping.split(":")) for mapping in router["ports"]}
    assert published == {(DEFAULTS.dicom.port,) * 2, (DEFAULTS.http.port,) * 2}
    targets = {volume.split(":")[1] for volume in router["volumes"]}
    (volume,) = docker["VOLUME"]
    assert targets == {volume, docker["WORKDIR"][0]}
    assert router["environment"]["DICOMROUTER_STORAGE__PATH"] == volume
    assert set(compose["volumes"]) == {v.split(":")[0] for v in router["volumes"]} - {"./config"}
    # The optional PostgreSQL service is there, commented out.
    assert "# postgres:" in (ROOT / "compose.yaml").read_text()


def test_the_deployment_guide_uses_the_shipped_files() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    for shipped in ("packaging/dicomrouter.service", "packaging/dicomrouter.sysusers"):
        assert shipped in text
    assert "compose.yaml" in text and "docker build" in text
    assert "CAP_NET_BIND_SERVICE" in text
    assert "deploy/compose-cluster.yml" in text


def test_the_cluster_compose_file_runs_two_nodes_on_one_database_and_one_volume() -> None:
    """deploy/compose-cluster.yml (docs/deployment.md, "Compose: two nodes and
    PostgreSQL"): the image the Dockerfile builds, twice, with distinct node names and
    published ports, the same configuration folder and the same storage volume, on
    the PostgreSQL service of the file; each node's environment is a valid
    configuration. Compose itself checks it too when it is installed."""
    from dicomrouter.config import parse_config

    path = ROOT / "deploy" / "compose-cluster.yml"
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "node-a", "node-b"}
    docker = dockerfile()
    (storage,) = docker["VOLUME"]
    nodes = [services["node-a"], services["node-b"]]
    names, published, mounts = [], [], []
    database = services["postgres"]["environment"]
    for node in nodes:
        assert node["build"] == ".." and node["image"] == services["node-a"]["image"]
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
        env = {key: str(value) for key, value in node["environment"].items()}
        config = parse_config({}, environ=env)  # every variable valid, none ignored
        assert str(config.storage.path) == storage
        url = env["DICOMROUTER_DATABASE"]
        assert url.startswith(
            f"postgresql://{database['POSTGRES_USER']}:{database['POSTGRES_PASSWORD']}"
            f"@postgres/{database['POSTGRES_DB']}?application_name={config.node.name}"
        )
        names.append(config.node.name)
        ports = {int(t): int(p) for p, t in (m.split(":") for m in node["ports"])}
        assert set(ports) == {DEFAULTS.dicom.port, DEFAULTS.http.port}
        published += ports.values()
        mounts.append(sorted(node["volumes"]))
    assert len(set(names)) == 2, "each node needs its own node.name"
    assert len(set(published)) == 4, "two nodes on one host publish distinct ports"
    # One configuration folder and one storage volume, the same for both.
    assert (
        mounts[0] == mounts[1] == sorted(["../config:/etc/dicomrouter", f"dicom-shared:{storage}"])
    )
    assert set(compose["volumes"]) == {"dicom-shared", "postgres-data"}
    compose_tool = shutil.which("docker-compose")
    if compose_tool:
        result = subprocess.run(
            [compose_tool, "-f", str(path), "config", "--quiet"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
