"""The Node.js client (clients/node, @grpc/grpc-js) against a real server on the embedded model.

CI installs its packages first: ``npm ci --prefix clients/node`` (scripts/test.sh does).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffstack.config import load_settings
from diffstack.engine import Engine
from diffstack.testing import BASELINE_PLUGINS, baseline_settings
from diffstack_server import BackgroundServer
from diffstack_server.testing import ReferenceRecorder, Seen, make_certificate

ROOT = Path(__file__).resolve().parents[1]
NODE_CLIENT = ROOT / "clients/node"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="node is not installed (needs Node.js 20+)"
)


def node_summary(script_or_args: str | list[str], *args: str) -> dict[str, Any]:
    """Run a Node script (an ES module's source, or ``node`` arguments) in clients/node against a
    server; it must succeed and print its summary as JSON on its last line, which is returned."""
    if not (NODE_CLIENT / "node_modules/@grpc/grpc-js").is_dir():
        pytest.fail("the Node client's packages are missing: run `npm ci --prefix clients/node` first")
    command = (
        script_or_args if isinstance(script_or_args, list) else ["--input-type=module", "-e", script_or_args]
    )
    finished = subprocess.run(
        ["node", *command, *args], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    summary: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return summary


@pytest.mark.slow
def test_node_client_generates_streams_lists_and_sees_invalid_argument(tmp_path: Path) -> None:
    settings = load_settings(server={"port": 0, "metrics_port": 0}, plugins={"allow": list(BASELINE_PLUGINS)})
    with BackgroundServer(settings) as server:
        summary = node_summary(
            ["src/demo.js", "--target", server.target, "--out", str(tmp_path), "--steps", "3"],
            *("--format", "webp", "--quality", "80", "--effort", "0"),
        )
    assert summary["ok"] is True
    assert set(BASELINE_PLUGINS) <= set(summary["plugins"])
    assert summary["progress"] == [1, 2, 3]
    assert summary["rejected"] == {
        "code": "INVALID_ARGUMENT",
        "fields": ["spec.width"],
        "reason": "INVALID_REQUEST",
    }
    assert [Path(f).name for f in summary["files"]] == ["stream-7.png", "unary-8.webp"]
    for file in summary["files"]:
        assert Image.open(file).size == (64, 64)


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", "src/demo.js", *args], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=60
    )


def test_node_demo_prints_its_usage_for_help_and_bad_flags() -> None:
    shown = _demo("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: node src/demo.js")
    assert "--target HOST:PORT" in shown.stdout and "at " not in shown.stderr
    refused = _demo("--bogus")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: Unknown option '--bogus'") and "usage:" in refused.stderr


def test_node_demo_reports_an_unreachable_target_in_one_line() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"
    failed = _demo("--target", target)
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"error: {target}: UNAVAILABLE: ")
    assert failed.stderr.count("\n") == 1, failed.stderr


INPAINT_SCRIPT = """
import { connect, imageFile, statusDetails } from "./src/client.js";
const [target, dir] = process.argv.slice(1);
const client = connect(target, { timeoutMs: 60000 });
const spec = { prompt: "a", steps: 2, strength: 1.0, seeds: ["1"], init_image: imageFile(`${dir}/init.png`) };
const { result } = await client.generate({ spec: { ...spec, mask: imageFile(`${dir}/mask.png`) } });
const refused = await client.generate({ spec: { ...spec, mask: imageFile(`${dir}/small.png`) } })
  .then(() => ({}), (error) => statusDetails(error).violations);
console.log(JSON.stringify({ width: result.images[0].image.width, refused: Object.keys(refused) }));
client.close();
"""


@pytest.mark.slow
def test_node_client_inpaints_with_a_mask_and_sees_a_bad_one_refused(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    Image.new("L", (32, 64), 255).save(tmp_path / "small.png")
    settings = load_settings(
        server={"port": 0, "metrics_port": 0},
        plugins={"allow": list(BASELINE_PLUGINS)},
        engine={"warmup_steps": 0},
    )
    with BackgroundServer(settings) as server:
        summary = node_summary(INPAINT_SCRIPT, server.target, str(tmp_path))
    assert summary == {"width": 64, "refused": ["spec.mask"]}


LORA_SCRIPT = """
import { writeFileSync } from "node:fs";
import { connect, statusDetails } from "./src/client.js";
const [target, dir] = process.argv.slice(1);
const client = connect(target, { timeoutMs: 60000 });
const listed = (await client.listLoras()).loras.find((l) => l.name === "colour-swap");
const spec = { prompt: "a large red circle in the center", seeds: ["1"] };
for (const [name, loras] of [["plain", []], ["swapped", [{ name: "colour-swap", scale: 1.0 }]]]) {
  const { result } = await client.generate({ spec: { ...spec, loras } });
  writeFileSync(`${dir}/${name}.png`, result.images[0].image.data);
}
const refused = await client.generate({ spec: { ...spec, loras: [{ name: "nope" }] } })
  .then(() => ({}), (error) => statusDetails(error).violations);
console.log(JSON.stringify({
  rank: listed.rank, compatible: listed.compatible_models, targets: listed.target_modules,
  refused: Object.keys(refused),
}));
client.close();
"""


@pytest.mark.slow
def test_node_client_lists_loras_and_sends_them_in_a_spec(tmp_path: Path) -> None:
    from diffstack.synthetic.analysis import analyse

    settings = load_settings(server={"port": 0, "metrics_port": 0}, plugins={"allow": list(BASELINE_PLUGINS)})
    with BackgroundServer(settings) as server:
        summary = node_summary(LORA_SCRIPT, server.target, str(tmp_path))
    assert summary == {
        "rank": 8,
        "compatible": ["default"],
        "targets": ["to_k", "to_out.0", "to_q", "to_v"],
        "refused": ["spec.loras[0].name"],
    }
    assert analyse(Image.open(tmp_path / "plain.png")).colour == "red"
    assert analyse(Image.open(tmp_path / "swapped.png")).colour == "green"


LIFECYCLE_SCRIPT = """
import { connect } from "./src/client.js";
const [target, token] = process.argv.slice(1);
const admin = connect(target, { adminToken: token, timeoutMs: 60000 });
const stranger = connect(target, { adminToken: "wrong", timeoutMs: 60000 });
const loaded = await admin.loadModel("tiny-sd2");
const stats = await admin.getStats();
const refused = await stranger.freeMemory().then(() => "OK", (error) => error.code);
const unloaded = await admin.unloadModel("tiny-sd2");
await admin.loadModel("tiny-sd2");
const freed = await admin.freeMemory();
const listed = await admin.listModels();
const plugins = (await admin.listPlugins()).plugins;
const deepcache = plugins.find((p) => p.name === "deepcache").wrappers[0];
const interval = deepcache.options.find((o) => o.name === "interval");
console.log(JSON.stringify({
  loaded: loaded.model.name, loadedNow: loaded.loaded_now, host: Number(loaded.model.host_memory_bytes),
  statsModels: stats.loaded_models.map((m) => m.name).sort(), refused, unloaded: unloaded.unloaded,
  freed: freed.unloaded, freedBytes: Number(freed.freed_bytes),
  stillLoaded: listed.models.filter((m) => m.loaded).map((m) => m.name),
  wrapper: deepcache.wrapper, interval: [interval.type, interval.minimum, interval.default_value.int_value],
}));
admin.close();
stranger.close();
"""


@pytest.mark.slow
def test_node_client_manages_models_and_lists_wrapper_option_schemas(models_dir: Path) -> None:
    settings = baseline_settings(
        models_dir,
        "tiny-sd1",
        server={"port": 0, "metrics_port": 0, "admin_token": "s3cret"},
        engine={"warmup_steps": 0},
        plugins={"allow": [*BASELINE_PLUGINS, "deepcache"]},
    )
    with BackgroundServer(settings) as server:
        summary = node_summary(LIFECYCLE_SCRIPT, server.target, "s3cret")
    assert summary["loaded"] == "tiny-sd2" and summary["loadedNow"] is True and summary["host"] > 0
    assert summary["statsModels"] == ["tiny-sd1", "tiny-sd2"]
    assert summary["refused"] == 7  # PERMISSION_DENIED
    assert summary["unloaded"] is True
    assert summary["freed"] == ["tiny-sd2"] and summary["freedBytes"] == summary["host"]
    assert summary["stillLoaded"] == ["tiny-sd1"]
    assert summary["wrapper"] == "deepcache"
    assert summary["interval"] == ["OPTION_TYPE_INT", 1, "3"]  # int64 travels as a string


KEYS_SCRIPT = """
import { connect } from "./src/client.js";
const [target, key] = process.argv.slice(1);
const spec = { prompt: "a cube", steps: 1, width: 64, height: 64 };
const keyed = connect(target, { apiKey: key });
const anonymous = connect(target);
const made = await keyed.generate({ spec });
let streamed = 0;
for await (const event of keyed.generateStream({ spec })) if (event.event === "result") streamed += 1;
const refused = await anonymous.generate({ spec }).then(() => "OK", (error) => error.code);
console.log(JSON.stringify({ images: made.result.images.length, streamed, refused }));
keyed.close();
anonymous.close();
"""


@pytest.mark.slow
def test_node_client_sends_its_api_key(models_dir: Path) -> None:
    key = "node-secret-key-0123456789"
    settings = baseline_settings(
        models_dir,
        "tiny-sd1",
        server={"port": 0, "metrics_port": 0, "api_keys": [{"label": "node", "key": key}]},
        engine={"warmup_steps": 0},
    )
    with BackgroundServer(settings) as server:
        summary = node_summary(KEYS_SCRIPT, server.target, key)
    assert summary == {"images": 1, "streamed": 1, "refused": 16}  # 16: UNAUTHENTICATED


JOBS_SCRIPT = """
import { connect } from "./src/client.js";
const [target] = process.argv.slice(1);
const client = connect(target);
const request = { spec: { prompt: "a cube", steps: 2, width: 64, height: 64, seeds: ["4"] } };
const { job_id } = await client.submitJob(request, "node-once");
const again = await client.submitJob(request, "node-once");
const kinds = [];
for await (const message of client.watchJob(job_id)) kinds.push(message.event.event);
const listed = (await client.listJobs()).jobs.map((job) => [job.job_id === job_id, job.state]);
const cancelled = await client.cancelJob(job_id);
const same = again.job_id === job_id;
console.log(JSON.stringify({ same, created: again.created, kinds, listed, state: cancelled.state }));
client.close();
"""


@pytest.mark.slow
def test_node_client_submits_watches_lists_and_cancels_jobs(models_dir: Path) -> None:
    settings = baseline_settings(
        models_dir, "tiny-sd1", server={"port": 0, "metrics_port": 0}, engine={"warmup_steps": 0}
    )
    with BackgroundServer(settings) as server:
        summary = node_summary(JOBS_SCRIPT, server.target)
    assert summary["same"] is True and summary["created"] is False
    assert summary["kinds"] == ["queued", "progress", "progress", "result"]
    assert summary["listed"] == [[True, "JOB_STATE_SUCCEEDED"]]
    assert summary["state"] == "JOB_STATE_SUCCEEDED"


PROFILE_SCRIPT = """
import { connect, statusDetails } from "./src/client.js";
const client = connect(process.argv[1], { timeoutMs: 60000 });
const { result } = await client.generate({ spec: { prompt: "a red circle", profile: "two", seeds: ["1"] } });
const refused = await client.generate({ spec: { prompt: "a red circle", profile: "speed" } })
  .then(() => ({}), (error) => statusDetails(error).violations);
console.log(JSON.stringify({ images: result.images.length, refused: Object.keys(refused) }));
client.close();
"""


@pytest.mark.slow
def test_node_client_names_a_profile_and_sees_a_refused_one() -> None:
    settings = load_settings(
        server={"port": 0, "metrics_port": 0},
        plugins={"allow": list(BASELINE_PLUGINS)},  # no AYS, no DeepCache: the speed profile is refused
        engine={"warmup_steps": 0},
        profiles={"two": {"steps": 2}},
    )
    with BackgroundServer(settings) as server:
        summary = node_summary(PROFILE_SCRIPT, server.target)
    assert summary == {"images": 1, "refused": ["spec.profile"]}


IMAGE_OPTION_SCRIPT = """
import { connect, imageFile, statusDetails } from "./src/client.js";
const [target, dir] = process.argv.slice(1);
const client = connect(target, { timeoutMs: 60000 });
const plugins = (await client.listPlugins()).plugins;
const image = plugins.find((p) => p.name === "reference").wrappers[0].options.find((o) => o.name === "image");
const spec = (picture) => ({
  prompt: "a cube", steps: 1, seeds: ["1"],
  wrappers: {
    reference: { options: { image: { image_value: imageFile(picture) }, weight: { double_value: 0.75 } } },
  },
});
const { result } = await client.generate({ spec: spec(`${dir}/green.png`) });
const refused = await client.generate({ spec: spec(`${dir}/junk.bin`) })
  .then(() => ({}), (error) => statusDetails(error).violations);
const images = result.images.length;
console.log(JSON.stringify({ type: image.type, images, refused: Object.keys(refused) }));
client.close();
"""


@pytest.mark.slow
def test_node_client_sends_a_picture_as_a_wrapper_option(models_dir: Path, tmp_path: Path) -> None:
    Image.new("RGB", (20, 12), (10, 240, 10)).save(tmp_path / "green.png")
    (tmp_path / "junk.bin").write_bytes(b"not a picture")
    recorder = ReferenceRecorder()
    settings = baseline_settings(
        models_dir, "tiny-sd1", server={"port": 0, "metrics_port": 0}, engine={"warmup_steps": 0}
    )
    engine = Engine.start(settings, recorder.host_with(settings))
    with BackgroundServer(settings, engine) as server:
        summary = node_summary(IMAGE_OPTION_SCRIPT, server.target, str(tmp_path))
    assert summary == {"type": "OPTION_TYPE_IMAGE", "images": 1, "refused": ["spec.wrappers.reference.image"]}
    assert recorder.seen == [Seen((20, 12), (10, 240, 10), 0.75)]


MTLS_SCRIPT = """
import { readFileSync } from "node:fs";
import { connect, grpc } from "./src/client.js";
const [target, dir] = process.argv.slice(1);
const read = (file) => readFileSync(`${dir}/${file}`);
const as = (name) => connect(target, {
  credentials: grpc.credentials.createSsl(read("test-ca.pem"), read(`${name}.key`), read(`${name}.pem`)),
});
const spec = { prompt: "a cube", steps: 1, width: 64, height: 64 };
const alice = as("alice");
const stranger = as("mallory");
const made = await alice.generate({ spec });
const refused = await stranger.generate({ spec }).then(() => "OK", (error) => error.code);
console.log(JSON.stringify({ images: made.result.images.length, refused }));
alice.close();
stranger.close();
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_node_client_is_a_caller_by_its_client_certificate(models_dir: Path, tmp_path: Path) -> None:
    ca = make_certificate(tmp_path, "test-ca")
    server_key, server_cert = make_certificate(tmp_path, "server", ca)
    make_certificate(tmp_path, "alice", ca, "DNS:alice.example")
    make_certificate(tmp_path, "mallory", ca, "DNS:mallory.example")
    tls = {"tls_cert": server_cert, "tls_key": server_key, "tls_client_ca": ca[1]}
    callers = [{"label": "alice", "tls_identity": "alice.example"}]
    settings = baseline_settings(
        models_dir,
        "tiny-sd1",
        server={"port": 0, "metrics_port": 0, **tls, "api_keys": callers},
        engine={"warmup_steps": 0},
    )
    with BackgroundServer(settings) as server:
        summary = node_summary(MTLS_SCRIPT, server.target, str(tmp_path))
    assert summary == {"images": 1, "refused": 16}  # 16: UNAUTHENTICATED
