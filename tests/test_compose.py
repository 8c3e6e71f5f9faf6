"""The docker-compose stack, validated offline (no image can be pulled here).

``docker-compose config -q`` checks the file; the parsed YAML is checked for
pinned images, the services, the mounts (every bind source exists in the
repository and lands where the configs expect it) and Prometheus' flags; the
stack's Prometheus config is checked by ``promtool check config``, rule files
included, and its Grafana provisioning for the exemplar link to Tempo.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import subprocess
import typing as t
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"app", "loadgen", "otel-collector", "tempo", "prometheus", "grafana"}


def compose() -> dict[str, t.Any]:
    data: dict[str, t.Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def service(name: str) -> dict[str, t.Any]:
    svc: dict[str, t.Any] = compose()["services"][name]
    return svc


def binds(name: str) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts."""
    mounts = {}
    for volume in service(name).get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def in_container(name: str, container_path: str) -> Path | None:
    """The repository path that a service sees at ``container_path``, if bind-mounted."""
    wanted = PurePosixPath(posixpath.normpath(container_path))
    for target, source in binds(name).items():
        target_path = PurePosixPath(target)
        if wanted == target_path or target_path in wanted.parents:
            return source / wanted.relative_to(target_path)
    return None


def flag(args: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")]
    return value


@pytest.mark.real
def test_docker_compose_config_is_valid() -> None:
    result = subprocess.run(
        [require_tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_services() -> None:
    assert set(compose()["services"]) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_are_pinned(name: str) -> None:
    image = service(name)["image"]
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, image
    assert tag != "latest" and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), image


def test_port_comments_match_the_published_ports() -> None:
    header = COMPOSE.read_text(encoding="utf-8").split("\nservices:")[0]
    for name in SERVICES:
        for mapping in service(name).get("ports", []):
            address, host_port, _container_port = mapping.split(":")
            assert address == "127.0.0.1", mapping
            assert re.search(rf"#.*\b{host_port}\b.*{name}", header), f"{name}:{host_port}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_bind_mounts_exist_in_the_repository(name: str) -> None:
    for source in binds(name).values():
        assert source.exists(), source


def test_the_app_runs_gunicorn_with_multiprocess_metrics() -> None:
    for name in ("app", "loadgen"):
        build = service(name)["build"]
        assert build["context"] == "." and (ROOT / build["dockerfile"]).is_file()
    app = service("app")
    command = app["command"]
    assert command[:3] == ["gunicorn", "-c", "examples/gunicorn.conf.py"]
    assert (ROOT / command[2]).is_file()
    module, _, attribute = command[3].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file() and attribute == "app"
    environment = app["environment"]
    multiproc = environment["PROMETHEUS_MULTIPROC_DIR"]
    assert any(mount.split(":")[0] == multiproc for mount in app["tmpfs"])  # empty per start
    assert environment["GUNICORN_BIND"] == "0.0.0.0:8000"
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"


def test_the_dockerfile_copies_files_that_exist() -> None:
    dockerfile = (ROOT / service("app")["build"]["dockerfile"]).read_text(encoding="utf-8")
    copies = re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE)
    assert copies
    for sources in copies:
        for source in shlex.split(sources):
            assert (ROOT / source).exists(), source
    assert 'CMD ["gunicorn", "-c", "examples/gunicorn.conf.py", "examples.wsgi:app"]' in dockerfile
    loadgen = service("loadgen")["command"]
    assert loadgen[:2] == ["python", "deploy/loadgen.py"] and "http://app:8000" in loadgen


def test_prometheus_keeps_exemplars_and_loads_the_repository_s_rules() -> None:
    args = service("prometheus")["command"]
    assert "--enable-feature=exemplar-storage" in args
    config_in_container = flag(args, "--config.file")
    config = in_container("prometheus", config_in_container)
    assert config is not None and config == ROOT / "deploy" / "prometheus.yml"
    # rule_files are relative to the config file, in the container as here.
    (pattern,) = yaml.safe_load(config.read_text(encoding="utf-8"))["rule_files"]
    container_rules = PurePosixPath(config_in_container).parent / pattern
    mounted = in_container("prometheus", str(container_rules.parent))
    assert mounted is not None and mounted.resolve() == (ROOT / "grafana" / "rules").resolve()
    assert sorted(mounted.glob(container_rules.name))
    here = sorted(path.resolve() for path in config.parent.glob(pattern))
    assert here == sorted(path.resolve() for path in mounted.glob(container_rules.name))


@pytest.mark.real
def test_the_stack_s_prometheus_config_passes_promtool_with_its_rules(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    # From another directory: the rule paths must not depend on the caller's cwd.
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    rule_files = sorted((ROOT / "grafana" / "rules").glob("*.yml"))
    assert f"SUCCESS: {len(rule_files)} rule files found" in output
    checked = re.findall(r"Checking (\S+)\n  SUCCESS: \d+ rules found", output)
    assert sorted(Path(path) for path in checked) == rule_files


def test_the_stack_scrapes_the_app() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["sigtrace-demo"]["static_configs"][0]["targets"]
    assert targets == ["app:8000"]
    assert "8000" in service("app")["ports"][0]


def test_grafana_provisions_datasources_and_dashboards() -> None:
    provisioning = in_container("grafana", "/etc/grafana/provisioning")
    assert provisioning == ROOT / "grafana" / "provisioning"
    (datasources_file,) = sorted((provisioning / "datasources").glob("*.yml"))
    datasources = {
        ds["type"]: ds for ds in yaml.safe_load(datasources_file.read_text())["datasources"]
    }
    prometheus, tempo = datasources["prometheus"], datasources["tempo"]
    assert prometheus["url"] == "http://prometheus:9090" and prometheus["isDefault"] is True
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": "tempo"}
    ]
    assert tempo["uid"] == "tempo" and tempo["url"] == "http://tempo:3200"
    (providers_file,) = sorted((provisioning / "dashboards").glob("*.yml"))
    (provider,) = yaml.safe_load(providers_file.read_text())["providers"]
    dashboards = in_container("grafana", provider["options"]["path"])
    assert dashboards == ROOT / "grafana" / "dashboards"
    assert sorted(dashboards.glob("*.json"))
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    home_file = in_container("grafana", home)
    assert home_file is not None and home_file.is_file()


def test_the_collector_forwards_otlp_to_tempo() -> None:
    collector = service("otel-collector")
    config_path = in_container("otel-collector", collector["command"][0].split("=", 1)[1])
    assert config_path is not None
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    (pipeline,) = config["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    assert config["exporters"][exporter]["endpoint"] == "tempo:4317"
    tempo = service("tempo")
    tempo_config = in_container("tempo", tempo["command"][0].split("=", 1)[1])
    assert tempo_config is not None
    receivers = yaml.safe_load(tempo_config.read_text())["distributor"]["receivers"]
    assert receivers["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


def test_the_multiprocess_directory_passes_sigtrace_s_check(tmp_path: Path) -> None:
    """The tmpfs is private to the image's user: sigtrace refuses 1777."""
    from sigtrace.multiprocess_directory import directory_problem

    app = service("app")
    multiproc = app["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    (mount,) = [m for m in app["tmpfs"] if m.split(":")[0] == multiproc]
    options = dict(o.split("=") for o in mount.split(":", 1)[1].split(","))
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    uid = re.search(r"useradd .*--uid (\d+) .*?(\w+)\s*\\?$", dockerfile, re.MULTILINE)
    assert uid is not None and options["uid"] == uid.group(1) == options["gid"]
    assert re.search(rf"^USER {uid.group(2)}$", dockerfile, re.MULTILINE)
    assert f"-m 0700 {multiproc}" in dockerfile  # the image's own copy, for a run without it
    # The same mode, owned by this process's user, as the container's user owns it.
    directory = tmp_path / "multiproc"
    directory.mkdir()
    directory.chmod(int(options["mode"], 8))
    assert directory_problem(str(directory)) is None
