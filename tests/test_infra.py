"""The KubeRay manifests only name jobs that exist, with options covidray accepts."""

import glob
import os
import shlex

import pytest
import yaml

from covidray.cli import build_parser

from conftest import REPO


def entrypoints():
    for path in sorted(glob.glob(os.path.join(REPO, "infra", "k8s", "*.yaml"))):
        with open(path) as fh:
            spec = yaml.safe_load(fh)["spec"]
        spec = spec.get("jobTemplate", spec)
        if "entrypoint" in spec:
            for command in spec["entrypoint"].split("&&"):
                yield os.path.basename(path), shlex.split(command)


@pytest.mark.parametrize("manifest,command", list(entrypoints()))
def test_manifest_entrypoint_parses(manifest, command):
    assert command[0] == "python" and command[1].startswith("/home/ray/covidray/jobs/")
    job = os.path.basename(command[1])
    assert os.path.exists(os.path.join(REPO, "jobs", job)), job
    build_parser().parse_args([job.removesuffix(".py"), *command[2:]])  # exits on a bad option


def test_every_job_has_a_manifest_or_is_local_only():
    named = {os.path.basename(c[1]) for _, c in entrypoints()}
    assert {"train.py", "export.py", "score.py"} <= named
