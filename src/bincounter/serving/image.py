"""`bincounter deploy build-image`: the serving image for one registered model, and its push to ECR.

The build context is assembled in a temp folder: the repository's docker/serving/Dockerfile, the model
(downloaded from MLflow), its requirements.txt, the project's constraints.txt (the README install's
resolution) and, with --wheels DIR, every wheel the image needs, downloaded on this machine first so the
build installs offline (`docker build --network none`, `pip install --no-index`).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bincounter import tracking
from bincounter.config import Config
from bincounter.errors import BincounterError, first_line
from bincounter.serving.predict import model_uri_for
from bincounter.serving.regions import deploy_region

DEFAULT_BASE = "python:3.11-slim"
SERVER_FILE = "bincounter_server.py"
_ECR_URI = re.compile(r"^(?P<registry>\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?)/(?P<repo>[^:@]+)(?::(?P<tag>.+))?$")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def dockerfile() -> Path:
    path = repo_root() / "docker" / "serving" / "Dockerfile"
    if not path.is_file():
        raise BincounterError(f"{path} not found: build the image from a checkout of the bincounter repository")
    return path


def _run(cmd: list[str], what: str, *, input_text: str | None = None, quiet: bool = False) -> str:
    try:
        proc = subprocess.run(cmd, input=input_text, text=True, check=False,
                              stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise BincounterError(f"{what}: {cmd[0]} is not installed") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
        raise BincounterError(f"{what} failed ({cmd[0]} exit {proc.returncode}): "
                              f"{lines[-1] if lines else 'no message'}")
    return proc.stdout or ""


def docker_available() -> str:
    """"" when a Docker daemon answers, else why not."""
    try:
        proc = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=20, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"docker: {type(exc).__name__}"
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no Docker daemon"])[-1]


def download_model(config: Config, model: str | None, dest: Path) -> Path:
    """The MLflow model at `model` (default @champion) into dest; checked to be a pyfunc."""
    import mlflow

    uri = model_uri_for(config, model)
    tracking.setup(config)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as exc:  # noqa: BLE001 - MlflowException, OSError...
        raise BincounterError(f"cannot download model {uri}: {first_line(exc)}") from None
    if not (local / "MLmodel").is_file() and (local / "model" / "MLmodel").is_file():
        local = local / "model"
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file() or "python_function" not in mlmodel.read_text():
        raise BincounterError(f"{uri} is not an MLflow pyfunc model (no python_function flavor in MLmodel)")
    if not (local / "requirements.txt").is_file():
        raise BincounterError(f"{uri} has no requirements.txt: re-log it with bincounter (pip_requirements)")
    return local


def constraints_for(requirements: list[str]) -> str:
    """The checkout's constraints.txt minus the packages the model pins itself (the model's versions win)."""
    path = repo_root() / "constraints.txt"
    if not path.is_file():
        return ""
    pinned = {_name(line) for line in requirements if "==" in line}
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#") and _name(line) not in pinned]
    return "\n".join(kept) + "\n"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def base_platform(base: str) -> dict[str, str]:
    """Python version, glibc and machine of the base image, so the host downloads wheels that install there."""
    script = ("import platform, sys; print(f'{sys.version_info[0]}.{sys.version_info[1]} "
              "{platform.libc_ver()[1]} {platform.machine()}')")
    out = _run(["docker", "run", "--rm", "--network", "none", base, "python3", "-c", script],
               f"reading the Python of base image {base}", quiet=True).split()
    if len(out) != 3 or not out[1]:
        raise BincounterError(f"base image {base}: expected a glibc Linux with python3, got {' '.join(out)!r}")
    return {"python": out[0], "glibc": out[1].replace(".", "_"), "machine": out[2]}


def platform_tags(platform: dict[str, str]) -> list[str]:
    """manylinux tags a wheel may carry to install on the base image's glibc, newest first."""
    major, minor = (int(x) for x in platform["glibc"].split("_")[:2])
    machine = platform["machine"]
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
    return tags + [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]


def download_wheels(requirements: Path, constraints: Path, wheels: Path, platform: dict[str, str]) -> int:
    """pip download of every wheel for the base image's platform into wheels/ (files already there are kept)."""
    import sys

    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(wheels),
           "-r", str(requirements), "-c", str(constraints), "--only-binary=:all:",
           "--python-version", platform["python"], "--implementation", "cp"]
    for tag in platform_tags(platform):  # pip takes the tags literally: every glibc up to the base's
        cmd += ["--platform", tag]
    print(f"build-image: downloading wheels for Python {platform['python']} "
          f"(manylinux_{platform['glibc']}_{platform['machine']}) into {wheels}", flush=True)
    _run(cmd, "pip download")
    return len(list(wheels.glob("*.whl")))


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in source.glob("*.whl"):
        try:
            os.link(wheel, dest / wheel.name)
        except OSError:
            shutil.copy2(wheel, dest / wheel.name)


def build_context(config: Config, model: str | None, context: Path, base: str, wheels: str | None) -> Path:
    """Fill `context` with everything docker/serving/Dockerfile copies."""
    from bincounter.serving import image_server

    app = context / "app"
    (app / "bin").mkdir(parents=True)
    downloaded = download_model(config, model, context / "download")
    shutil.copytree(downloaded, app / "model")
    shutil.rmtree(context / "download")
    local = app / "model"
    shutil.copyfile(image_server.__file__, app / SERVER_FILE)
    serve = app / "bin" / "serve"
    serve.write_text(f'#!/bin/sh\nexec python3 /opt/bincounter/{SERVER_FILE} serve "$@"\n')
    serve.chmod(0o755)
    requirements = (local / "requirements.txt").read_text()
    (context / "requirements.txt").write_text(requirements)
    (context / "constraints.txt").write_text(constraints_for(requirements.splitlines()))
    shutil.copyfile(dockerfile(), context / "Dockerfile")
    (context / "wheels").mkdir()
    if wheels:
        count = download_wheels(context / "requirements.txt", context / "constraints.txt", Path(wheels),
                                base_platform(base))
        _link_or_copy(Path(wheels), context / "wheels")
        print(f"build-image: {count} wheels in {wheels}; the build installs them offline", flush=True)
    return context


def build_image(config: Config, model: str | None, tag: str, base: str | None = None, wheels: str | None = None,
                push: bool = False) -> str:
    """Build (and with push, push to ECR) the serving image; -> the image reference (the ECR URI with push)."""
    if not tag or not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9._/:@-]*", tag):
        raise BincounterError(f"--tag {tag!r} is not an image name (e.g. bin-counter-serving:3)")
    base = base or DEFAULT_BASE
    problem = docker_available()
    if problem:
        raise BincounterError(f"build-image needs a Docker daemon: {problem}")
    with tempfile.TemporaryDirectory(prefix="bincounter-image-") as scratch:
        context = build_context(config, model, Path(scratch), base, wheels)
        # no --label: the legacy builder adds it as one more step, a full copy of the image on vfs
        cmd = ["docker", "build", "-t", tag, "--build-arg", f"BASE={base}"]
        if wheels:
            cmd += ["--network", "none"]  # proves the build is offline
        print(f"build-image: docker build -t {tag} (base {base}) ...", flush=True)
        _run(cmd + [str(context)], "docker build")
    size = _run(["docker", "image", "inspect", tag, "--format", "{{.Size}}"], "docker image inspect", quiet=True)
    print(f"build-image: built {tag} ({int(size.strip() or 0) / 2**30:.2f} GiB); try it: docker run --rm -p 8080:8080 "
          f"{tag} serve", flush=True)
    if push:
        return push_image(config, tag)
    return tag


# ------------------------------------------------------------------ ECR


def ecr_target(tag: str, registry: str) -> tuple[str, str]:
    """(repository name, full ECR reference) for a local tag such as bin-counter-serving:3 or an ECR URI."""
    match = _ECR_URI.match(tag)
    if match:
        return match["repo"], tag
    name, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    return name, f"{registry}/{name}:{version}"


def ecr_login(config: Config, repository: str) -> dict[str, str]:
    """The repository (created when missing, scan on push) and a docker login from ecr:GetAuthorizationToken.
    -> {"registry", "repository_uri", "username", "password"}"""
    import boto3

    region = deploy_region(config)
    ecr = boto3.client("ecr", region_name=region)
    try:
        try:
            uri = ecr.describe_repositories(repositoryNames=[repository])["repositories"][0]["repositoryUri"]
        except ecr.exceptions.RepositoryNotFoundException:
            uri = ecr.create_repository(repositoryName=repository,
                                        imageScanningConfiguration={"scanOnPush": True})["repository"]["repositoryUri"]
            print(f"build-image: created ECR repository {uri}")
        auth = ecr.get_authorization_token()["authorizationData"][0]
    except Exception as exc:  # noqa: BLE001 - botocore errors, no credentials
        raise BincounterError(f"ECR in {region}: {first_line(exc)}") from None
    username, _, password = base64.b64decode(auth["authorizationToken"]).decode().partition(":")
    registry = uri.split("/", 1)[0]
    return {"registry": registry, "repository_uri": uri, "username": username, "password": password}


def push_image(config: Config, tag: str) -> str:
    repository, _ = ecr_target(tag, registry="")  # the registry is known only after the login
    login = ecr_login(config, repository)
    _, target = ecr_target(tag, login["registry"])
    _run(["docker", "login", "--username", login["username"], "--password-stdin", login["registry"]],
         f"docker login {login['registry']}", input_text=login["password"], quiet=True)
    if target != tag:
        _run(["docker", "tag", tag, target], "docker tag", quiet=True)
    _run(["docker", "push", target], f"docker push {target}")
    print(f"build-image: pushed {target}; deploy it with --set deploy.image_url={target}")
    return target
