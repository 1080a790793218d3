"""The deployment files do what they say: KubeRay manifests valid against the real v1.7.0 CRDs
(closed objects, so a misspelled field fails), one-command entrypoints the CLI parses, GPU in
limits, limits = requests; the Dockerfile's sources exist and .dockerignore keeps secrets out."""

import copy
import glob
import os
import re
import shlex

import pytest
import yaml
from jsonschema import Draft7Validator

from covidray.cli import build_parser

from conftest import REPO

CRDS = os.path.join(REPO, "..", "shared", "kuberay-crds", "v1.7.0")
K8S = os.path.join(REPO, "infra", "k8s")


def closed(schema):
    """The schema with every object that lists ``properties`` closed to other fields (unless
    it preserves unknown fields), as the README of the CRDs suggests."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_validators() -> dict:
    if not os.path.isdir(CRDS):
        pytest.skip("../shared/kuberay-crds is absent")
    validators = {}
    for path in glob.glob(os.path.join(CRDS, "*.yaml")):
        crd = yaml.safe_load(open(path))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[crd["spec"]["names"]["kind"]] = Draft7Validator(
            closed(version["schema"]["openAPIV3Schema"]))
    return validators


def documents():
    """(file, document) for every object in infra/k8s, and the RayJob a CronJob creates."""
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        for doc in yaml.safe_load_all(open(path)):
            yield os.path.basename(path), doc
            if doc["kind"] == "ConfigMap":
                for text in doc["data"].values():
                    yield os.path.basename(path), yaml.safe_load(text)


def ray_documents():
    return [(name, doc) for name, doc in documents() if doc["apiVersion"] == "ray.io/v1"]


def job_specs():
    for name, doc in ray_documents():
        if doc["kind"] == "RayJob":
            yield name, doc["spec"]
        elif doc["kind"] == "RayCronJob":
            yield name, doc["spec"]["jobTemplate"]


@pytest.mark.parametrize("name,doc", ray_documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_is_valid_against_the_kuberay_crd(name, doc):
    errors = sorted(crd_validators()[doc["kind"]].iter_errors(doc), key=str)
    assert not errors, f"{name}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


def test_the_closed_schema_catches_a_misspelled_field():
    validators = crd_validators()
    _, doc = next((n, d) for n, d in ray_documents() if d["kind"] == "RayJob")
    wrong = copy.deepcopy(doc)
    wrong["spec"]["shutdownAfterJobFinish"] = wrong["spec"].pop("shutdownAfterJobFinishes")
    assert list(validators["RayJob"].iter_errors(wrong))
    wrong = copy.deepcopy(doc)
    container = wrong["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    assert list(validators["RayJob"].iter_errors(wrong))


@pytest.mark.parametrize("name,spec", list(job_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_each_entrypoint_is_one_command_that_the_cli_parses(name, spec):
    command = shlex.split(spec["entrypoint"])
    assert not {"&&", "||", ";", "|"} & set(command), f"{name}: more than one command"
    assert not any(re.search(r"[;&|`$]", word) for word in command), command
    assert command[0] == "python" and command[1].startswith("/home/ray/covidray/jobs/")
    job = os.path.basename(command[1])
    assert os.path.exists(os.path.join(REPO, "jobs", job)), job
    build_parser().parse_args([job.removesuffix(".py"), *command[2:]])  # exits on a bad option


@pytest.mark.parametrize("name,spec", list(job_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_jobs_set_deadlines_retries_and_cleanup_and_size_gpus_in_limits(name, spec):
    for field in ("activeDeadlineSeconds", "backoffLimit", "shutdownAfterJobFinishes",
                  "ttlSecondsAfterFinished"):
        assert field in spec, f"{name}: {field} not set"
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    gpus = 0
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert resources["limits"] == resources["requests"], (name, container["name"])
            gpus += int(resources["limits"].get("nvidia.com/gpu", 0))
            assert "env" not in container or not any("SECRET" in e["name"]
                                                     for e in container["env"])
    if gpus:
        assert "--use-gpu" in spec["entrypoint"], f"{name}: GPU workers but no --use-gpu"


def test_training_comes_in_cpu_and_gpu_variants_and_nightly_scoring_in_two_forms():
    kinds = {(name, doc["kind"]) for name, doc in documents()}
    assert {("rayjob-train-cpu.yaml", "RayJob"), ("rayjob-train-gpu.yaml", "RayJob"),
            ("raycronjob-score.yaml", "RayCronJob"), ("cronjob-score.yaml", "CronJob"),
            ("cronjob-score.yaml", "RayJob")} <= kinds
    cronjob = next(doc for name, doc in documents() if doc["kind"] == "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid" and cronjob["spec"]["timeZone"]
    raycron = next(doc for name, doc in documents() if doc["kind"] == "RayCronJob")
    assert raycron["spec"]["timeZone"]
    assert "feature gate RayCronJob" in open(os.path.join(K8S, "raycronjob-score.yaml")).read()
    cluster = next(doc for name, doc in documents() if doc["kind"] == "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile: continuations joined, heredoc bodies
    (``RUN python - <<'PY' ... PY``) and comments skipped."""
    text = open(os.path.join(REPO, "Dockerfile")).read().replace("\\\n", " ")
    instructions, heredoc = [], None
    for line in text.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        op, _, rest = line.strip().partition(" ")
        instructions.append((op, rest))
        marker = re.search(r"<<-?'?\"?(\w+)", rest)
        heredoc = marker.group(1) if marker else None
    return instructions


def test_every_dockerfile_copy_source_exists_and_the_image_runs_as_a_user():
    instructions = dockerfile_instructions()
    copies = [shlex.split(rest) for op, rest in instructions if op.upper() == "COPY"]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert glob.glob(os.path.join(REPO, source)), f"COPY source {source} is missing"
    users = [rest.strip() for op, rest in instructions if op.upper() == "USER"]
    assert users and users[-1] not in ("root", "0")
    args = {rest.split("=")[0].strip() for op, rest in instructions if op.upper() == "ARG"}
    assert "VARIANT" in args  # cpu or gpu from one file


def test_dockerignore_keeps_the_venv_local_secrets_and_git_out():
    with open(os.path.join(REPO, ".dockerignore")) as fh:
        patterns = {line.strip().rstrip("/") for line in fh if line.strip()
                    and not line.startswith("#")}
    assert {".venv", ".local", ".git"} <= patterns


def refused_anonymously(url: str, body: bytes | None = None, method: str = "GET") -> str:
    """How an internal port answers a caller with no certificate: plain HTTP gets 400 (its
    port speaks HTTPS), HTTPS without a client certificate fails the handshake. Fails the
    test on any other answer."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, data=body, method=method), timeout=10)
    except urllib.error.HTTPError as refused:
        assert refused.code in (400, 401), (method, url, refused.code)
        return f"http {refused.code}"
    except (urllib.error.URLError, ssl.SSLError, ConnectionError) as refused:
        return f"refused: {type(getattr(refused, 'reason', refused)).__name__}"
    raise AssertionError(f"{method} {url} was answered without credentials")


def weed_shell(directory: str, ports: dict, command: str, with_config: bool) -> str:
    """``weed shell`` from an empty folder and home (so it finds no security.toml of its own),
    with this server's certificates or without; its output ('' when it could not connect)."""
    import subprocess
    import tempfile

    import s3_server

    home = tempfile.mkdtemp()
    args = [s3_server.weed_binary(), *([f"-config_dir={directory}"] if with_config else []),
            "shell", f"-master=127.0.0.1:{ports['master']}", f"-filer=127.0.0.1:{ports['filer']}"]
    try:
        done = subprocess.run(args, input=f"{command}\nexit\n", capture_output=True, text=True,
                              cwd=home, env={**os.environ, "HOME": home}, timeout=20)
        return done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        return ""  # it kept trying to connect


def test_local_s3_server_restarts_on_its_data_and_leaves_no_anonymous_door(tmp_path,
                                                                             monkeypatch):
    """down.sh then up.sh, on a data directory made before mutual TLS: the server comes back
    on its data, now with TLS. Nothing anonymous reads, writes or deletes the store through
    SeaweedFS's internal ports: not the filer or volume HTTP ports, not the master's
    ``/col/delete``, not ``weed shell`` on the gRPC ports (which works with the certificates)."""
    import json
    import stat

    import s3_server

    from covidray.storage import Storage, StorageSettings

    directory = str(tmp_path / "s3")
    env = s3_server.start(directory, s3_server.free_port())
    try:
        def storage():
            return Storage(StorageSettings(endpoint_url=env["AWS_ENDPOINT_URL"]))

        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, env[key])
        storage().ensure_bucket("s3://kept")
        storage().write_bytes("s3://kept/a.txt", b"still here")
        assert s3_server.stop(directory)
        security = os.path.join(directory, "security.toml")
        with open(security) as fh:  # as a data directory made before mutual TLS has it
            jwt_only = fh.read().split("[grpc]")[0]
        with open(security, "w") as fh:
            fh.write(jwt_only)
        env = s3_server.start(directory, int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]),
                              timeout=30)
        assert storage().read_bytes("s3://kept/a.txt") == b"still here"
        with open(security) as fh:
            upgraded = fh.read()
        assert upgraded.startswith(jwt_only) and "[grpc]" in upgraded and "[https.master]" in upgraded

        with open(os.path.join(directory, "ports.json")) as fh:
            ports = json.load(fh)
        filer, volume, master, admin = (f"127.0.0.1:{ports[n]}"
                                        for n in ("filer", "volume", "master", "admin"))
        for scheme in ("http", "https"):
            for method, path, body in [("GET", f"{filer}/buckets/kept/a.txt", None),
                                       ("GET", f"{filer}/buckets/kept/", None),
                                       ("PUT", f"{filer}/buckets/kept/evil.txt", b"x"),
                                       ("DELETE", f"{filer}/buckets/kept/a.txt", None),
                                       ("GET", f"{volume}/1,01", None),
                                       ("POST", f"{volume}/1,01", b"x"),
                                       ("GET", f"{master}/dir/assign", None),
                                       ("GET", f"{master}/col/delete?collection=kept", None),
                                       ("GET", f"{admin}/", None)]:
                refused_anonymously(f"{scheme}://{path}", body, method)
        weed_shell(directory, ports, "fs.rm /buckets/kept/a.txt", with_config=False)
        assert storage().read_bytes("s3://kept/a.txt") == b"still here"
        assert not storage().exists("s3://kept/evil.txt")
        # The same shell with the server's certificates connects: the door is the TLS.
        listed = weed_shell(directory, ports, "fs.ls /buckets/kept", with_config=True)
        assert re.search(r"\ba\.txt\b", listed), listed
        for name in ("credentials.json", "s3.json", "security.toml",
                     *(f"tls/{f}" for f in os.listdir(os.path.join(directory, "tls")))):
            mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            assert mode == 0o600, (name, oct(mode))
        assert not os.path.exists(os.path.join(directory, "tls", "ca.key"))
    finally:
        s3_server.stop(directory)


@pytest.mark.cluster
def test_two_local_stacks_run_side_by_side_and_a_taken_port_is_named(tmp_path):
    """Two infra/local stacks (S3 server + Ray head), each with its own state folder and
    ports from the environment, up at once; each answers with its own token and keys, and a
    job submitted to the first runs there. A third asking for a port the first holds stops,
    naming the variable that moves it."""
    import subprocess
    import urllib.error
    import urllib.request

    from s3_server import free_port

    variables = ("COVIDRAY_S3_PORT", "COVIDRAY_RAY_PORT", "COVIDRAY_RAY_DASHBOARD_PORT",
                 "COVIDRAY_RAY_CLIENT_PORT", "COVIDRAY_RAY_AGENT_PORT")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RAY_", "AWS_", "COVIDRAY_"))}

    def stack(name: str, **fixed) -> dict:
        return {**clean, "COVIDRAY_LOCAL": str(tmp_path / name),
                **{v: str(free_port()) for v in variables}, **fixed}

    def dashboard(env: dict, token_of: dict) -> int:
        with open(os.path.join(token_of["COVIDRAY_LOCAL"], "ray", "auth_token")) as fh:
            request = urllib.request.Request(
                f"http://127.0.0.1:{env['COVIDRAY_RAY_DASHBOARD_PORT']}/api/version",
                headers={"Authorization": f"Bearer {fh.read().strip()}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as refused:
            return refused.code

    stacks = {"a": stack("a"), "b": stack("b")}
    try:
        for env in stacks.values():
            up = subprocess.run(["infra/local/up.sh"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
            assert up.returncode == 0, up.stderr[-3000:]
        a, b = stacks["a"], stacks["b"]
        assert (dashboard(a, a), dashboard(b, b)) == (200, 200)
        assert dashboard(a, b) in (401, 403)  # two clusters, two tokens
        for name, env in stacks.items():  # each S3 server with the keys in its own env.sh
            check = subprocess.run(
                ["bash", "-c", f"source {env['COVIDRAY_LOCAL']}/env.sh && .venv/bin/python -c "
                 f"\"from covidray.storage import Storage; s = Storage(); "
                 f"s.ensure_bucket('s3://stack-{name}'); "
                 f"s.write_bytes('s3://stack-{name}/x', b'{name}'); "
                 f"print(s.read_bytes('s3://stack-{name}/x').decode())\""],
                cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)
            assert check.stdout.strip() == name, check.stderr[-2000:]
        # A job submitted to the first stack, started before the second, runs on the first:
        # with one shared Ray temp dir its supervisor handed it the second's address.
        job = subprocess.run(
            ["bash", "-c", f"source {a['COVIDRAY_LOCAL']}/env.sh && .venv/bin/ray job submit "
             "--address $COVIDRAY_RAY_DASHBOARD -- python -c \"import ray; ray.init(); "
             "print('GCS', ray.get_runtime_context().gcs_address)\""],
            cwd=REPO, env=clean, capture_output=True, text=True, timeout=300)
        assert re.search(rf"GCS [\d.]+:{a['COVIDRAY_RAY_PORT']}\n", job.stdout), (
            job.stdout[-2000:] + job.stderr[-2000:])

        stacks["c"] = stack("c", COVIDRAY_RAY_PORT=a["COVIDRAY_RAY_PORT"])
        taken = subprocess.run(["infra/local/up.sh"], cwd=REPO, env=stacks["c"],
                               capture_output=True, text=True, timeout=300)
        assert taken.returncode != 0
        assert f"port {a['COVIDRAY_RAY_PORT']} (the Ray GCS) is taken" in taken.stderr
        assert "COVIDRAY_RAY_PORT" in taken.stderr
        assert dashboard(a, a) == 200  # the first stack is untouched
    finally:
        for env in stacks.values():
            subprocess.run(["infra/local/down.sh"], cwd=REPO, env=env, capture_output=True,
                           timeout=120)


def test_a_fixed_ray_port_among_the_workers_ports_is_refused_before_the_start():
    # `ray start --ray-client-server-port=10011` fails with a long traceback: 10002-19999
    # are its workers' ports. up.sh says so in one line, naming the variable.
    import sys

    sys.path.insert(0, os.path.join(REPO, "infra", "local"))
    import ray_head

    with pytest.raises(SystemExit) as refused:
        ray_head.require_free({"client_port": 10011})
    assert str(refused.value) == (
        "port 10011 (the Ray client server) is among the ports Ray gives its workers "
        "(10002-19999): set COVIDRAY_RAY_CLIENT_PORT to a port outside that range and run "
        "infra/local/up.sh again")
