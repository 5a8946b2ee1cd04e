"""`hwr serve`'s API in process (FastAPI's test client): every endpoint, every bad request, the batcher,
and the same answers as `hwr predict` for the same image."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, one_error_line, run
from paper_images import paper_row, write_paper_digits
from PIL import Image, ImageDraw
from test_preprocess import blank_png

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from hwr_dist.data import load_dataset  # noqa: E402
from hwr_dist.data.preprocess import characters  # noqa: E402
from hwr_dist.commands.predict import predict_files  # noqa: E402
from hwr_dist.serve.app import create_app  # noqa: E402
from hwr_dist.serve.batcher import Batcher  # noqa: E402
from hwr_dist.serve.schemas import BatchResponse, ModelInfo, PredictResponse  # noqa: E402
from hwr_dist.serve.uploads import Limits  # noqa: E402

PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def run_dir(default_run):
    """The session's trained default model."""
    return default_run[0]


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(run_dir, max_batch=64, max_wait_ms=5)) as c:
        yield c


@pytest.fixture(scope="module")
def small_limits(run_dir):
    """A server with tiny limits, so that "too large" and "too many" need only small requests."""
    limits = Limits(max_image_bytes=20_000, max_images=4, max_body_bytes=60_000)
    with TestClient(create_app(run_dir, limits=limits)) as c:
        yield c


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three photos of digits on paper (PNG and JPEG) and a photo of a row of five digits."""
    folder = tmp_path_factory.mktemp("photos")
    test = load_dataset("mnist-sample", ".").test
    files = write_paper_digits(test.images[:3].numpy(), test.labels[:3].tolist(), folder)
    rng = np.random.default_rng(3)
    paper_row([test.images[i].numpy() for i in range(10, 15)], rng).save(folder / "row.png")
    return [f for f, _ in files], folder / "row.png"


def drawn_seven() -> bytes:
    img = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(img).line([(70, 60), (210, 60), (120, 230)], fill="black", width=20)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def predict_json(run_dir, paths, segment: bool, capsys) -> list[dict]:
    capsys.readouterr()
    assert predict_files(run_dir, list(paths), 3, True, segment) == 0
    return json.loads(capsys.readouterr().out)


def test_same_answers_as_hwr_predict(client, run_dir, photos, capsys):
    files, row = photos
    expected = predict_json(run_dir, files, False, capsys)
    for path, want in zip(files, expected):
        raw = client.post("/v1/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"})
        form = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
        for r in (raw, form):
            assert r.status_code == 200, r.text
            got = PredictResponse.model_validate(r.json()).model_dump(by_alias=True)
            assert {k: got[k] for k in ("prediction", "probability", "top")} == \
                {k: want[k] for k in ("prediction", "probability", "top")}
            assert got["characters"] is None and got["time_ms"] > 0
            assert r.json()["model_id"].startswith("fast_cnn-")

    want = predict_json(run_dir, [row], True, capsys)[0]
    r = client.post("/v1/predict?segment=true&include_input=true", content=row.read_bytes(), headers=PNG)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["prediction"] == want["prediction"] and got["characters"] == want["characters"]
    assert got["top"] is None and len(got["input"]) == len(got["prediction"]) == 5


def test_batch_and_inputs(client, photos):
    files, _ = photos
    parts = [("files", (p.name, p.read_bytes(), "image/png")) for p in files]
    r = client.post("/v1/predict/batch?top_k=2&include_input=true", files=parts)
    assert r.status_code == 200, r.text
    batch = BatchResponse.model_validate(r.json())
    assert len(batch.results) == 3
    for path, result in zip(files, r.json()["results"]):
        single = client.post("/v1/predict?top_k=2", content=path.read_bytes(), headers=PNG).json()
        assert result["top"] == single["top"] and len(result["top"]) == 2
        # the 28x28 image returned is what the shared preprocessing makes of the file
        png = base64.b64decode(result["input"][0].split(",", 1)[1])
        seen = torch.from_numpy(np.array(Image.open(io.BytesIO(png))))
        assert seen.shape == (28, 28) and torch.equal(seen, characters(path.read_bytes())[0])


def test_model_health_metrics_openapi(client, run_dir):
    info = client.get("/v1/model")
    assert info.status_code == 200
    m = ModelInfo.model_validate(info.json())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert m.format == "checkpoint" and m.architecture == "fast_cnn" and m.classes == [str(d) for d in range(10)]
    assert m.input["size"] == [28, 28] and m.input["ink"] == "white on black" and m.input["max_images_per_batch"] == 64
    assert m.training["test_accuracy"] == summary["test_accuracy"] and m.training["run_id"] == summary["run_id"]
    assert m.training["data_set"] == "mnist-sample" and m.batching == {"max_batch": 64, "max_wait_ms": 5}
    assert client.get("/healthz").json() == {"status": "ok", "model_id": m.id}

    client.post("/v1/predict", content=drawn_seven(), headers=PNG)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert 'hwr_requests_total{path="/v1/predict",status="200"}' in text
    assert 'hwr_request_duration_seconds_bucket{path="/v1/predict",le="+Inf"}' in text
    assert "hwr_batch_size_count" in text and 'hwr_batch_size_bucket{le="64"}' in text

    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/metrics", "/"} <= set(schema["paths"])
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    assert {"200", "400", "413", "415", "422"} <= set(schema["paths"]["/v1/predict"]["post"]["responses"])
    assert client.get("/docs").status_code == 404  # FastAPI's docs page loads scripts from a CDN: off


def test_page_and_assets_are_served_here(client):
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html and client.get(asset).status_code == 200
    for text in (html, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text  # works offline


def big_blank_png(w: int, h: int, tmp_path) -> bytes:
    return blank_png(tmp_path / "big.png", w, h).read_bytes()


def test_bad_requests_get_a_4xx_json_error(client, small_limits, photos, tmp_path):
    photo = photos[0][0].read_bytes()
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(blank, "PNG")
    faint = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).normal(200, 3, (64, 64)).clip(0, 255).astype(np.uint8)).save(faint, "PNG")
    cases = [  # (what, server, request, status, words in the error)
        ("not an image", client, dict(content=b"GIF89a? no, just text", headers=PNG), 400, "not an image"),
        ("empty", client, dict(content=b"", headers=PNG), 400, "empty"),
        ("empty file part", client, dict(files={"file": ("e.png", b"", "image/png")}), 400, "empty"),
        ("truncated", client, dict(content=photo[: len(photo) // 2], headers=PNG), 400, "truncated"),
        ("all one colour", client, dict(content=blank.getvalue(), headers=PNG), 400, "one colour"),
        ("no ink", client, dict(content=faint.getvalue(), headers=PNG), 422, "no ink"),
        ("20000x20000 pixels", client, dict(content=big_blank_png(20000, 20000, tmp_path), headers=PNG), 413, "huge"),
        ("wrong content type", client, dict(content=photo, headers={"content-type": "text/plain"}), 415,
         "text/plain"),
        ("no content type", client, dict(content=photo), 415, "content type"),
        ("json", client, dict(json={"image": "x"}), 415, "application/json"),
        ("malformed multipart", client, dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
         400, "multipart"),
        ("multipart without a file", client, dict(data={"note": "hi"}, files={"x": ("", b"", "")}), 400, "file"),
        ("two images to /v1/predict", client,
         dict(files=[("file", ("a.png", photo, "image/png")), ("file", ("b.png", photo, "image/png"))]), 400,
         "/v1/predict/batch"),
        ("over the size limit", small_limits, dict(content=b"\0" * 30_000, headers=PNG), 413, "over the limit"),
        ("over the size limit, chunked", small_limits, dict(content=iter([b"\0" * 15_000] * 2), headers=PNG), 413,
         "over the limit"),
        ("over the size limit, in a part", small_limits, dict(files={"file": ("b.png", b"\0" * 30_000)}), 413,
         "over the limit"),
        ("top_k out of range", client, dict(content=photo, headers=PNG, params={"top_k": 0}), 422, "top_k"),
    ]
    for what, server, request, status, words in cases:
        r = server.post("/v1/predict", **request)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert set(r.json()) == {"error"} and words in r.json()["error"], (what, r.json())

    tiny = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("L").resize((40, 40)).save(tiny, "PNG")
    five = [("files", (f"{n}.png", tiny.getvalue(), "image/png")) for n in range(5)]
    batch_cases = [
        ("too many images", small_limits, dict(files=five), 413, "too many images"),
        ("raw body to batch", client, dict(content=photo, headers=PNG), 415, "multipart"),
        ("one bad image in a batch", client, dict(files=[("files", ("a.png", photo)), ("files", ("b.txt", b"hi"))]),
         400, "image 2 (b.txt)"),
    ]
    for what, server, request, status, words in batch_cases:
        r = server.post("/v1/predict/batch", **request)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert words in r.json()["error"], (what, r.json())
    assert small_limits.post("/v1/predict/batch", files=five[:4]).status_code == 200

    for path, method, status in (("/nowhere", "get", 404), ("/v1/predict", "get", 405)):
        r = getattr(client, method)(path)
        assert r.status_code == status and "error" in r.json()
    # ...and the server keeps serving
    assert client.post("/v1/predict", content=photo, headers=PNG).status_code == 200
    assert 'path="/v1/predict",status="413"' in client.get("/metrics").text


def test_exports_serve_the_same_answers(client, run_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from hwr_dist.commands.export import export_checkpoint

    seven = drawn_seven()
    want = client.post("/v1/predict", content=seven, headers=PNG).json()
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt")):
        out = export_checkpoint(run_dir, fmt, out=tmp_path / f"m{suffix}", echo=lambda s: None).path
        with TestClient(create_app(out)) as c:
            info = c.get("/v1/model").json()
            assert info["format"] == fmt and info["file"] == out.name
            assert info["training"]["data_set"] == "mnist-sample" and info["training"]["test_accuracy"] is not None
            got = c.post("/v1/predict", content=seven, headers=PNG).json()
        assert got["prediction"] == want["prediction"] and got["model_id"] != want["model_id"]
        for a, b in zip(got["top"], want["top"]):
            assert a["class"] == b["class"] or abs(a["probability"] - b["probability"]) < 1e-3
            assert abs(a["probability"] - b["probability"]) < 1e-3


def test_the_started_server_is_kept_out_of_garbage_collection(run_dir):
    """torch, FastAPI and the model are frozen once the server starts: a full collection under load
    would otherwise scan them all (100-200 ms with the event loop stopped)."""
    gc.unfreeze()  # whatever earlier tests froze in this process
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(run_dir)) as c:
        assert c.post("/v1/predict", content=drawn_seven(), headers=PNG).status_code == 200
        assert gc.get_freeze_count() > 100_000
    gc.unfreeze()


def test_batcher_joins_requests_that_arrive_together():
    calls = []

    def run(x):
        calls.append(len(x))
        return x.float().mean((1, 2)).unsqueeze(1)

    async def scenario(max_batch: int, wait_ms: float, sizes: list[int], announce: int = 0) -> list[torch.Tensor]:
        b = Batcher(run, max_batch, wait_ms)
        await b.start()
        for _ in range(announce):
            b.announce()
        inputs = [torch.full((k, 28, 28), i, dtype=torch.uint8) for i, k in enumerate(sizes)]
        outs = await asyncio.gather(*(b.submit(x, announced=False) for x in inputs))
        await b.stop()
        for i, (x, out) in enumerate(zip(inputs, outs)):  # each request gets its own rows back
            assert out.shape == (len(x), 1) and bool((out == i).all())
        return outs

    asyncio.run(scenario(64, 5, [1] * 10))
    assert calls == [10]  # ten requests at once: one forward pass
    calls.clear()
    asyncio.run(scenario(4, 5, [1] * 10))
    assert calls == [4, 4, 2]  # never more than max_batch
    calls.clear()
    asyncio.run(scenario(4, 5, [3, 6, 1]))
    assert calls == [3, 4, 3]  # a request larger than max_batch is split; the rest fill up
    calls.clear()
    asyncio.run(scenario(1, 5, [1] * 3))
    assert calls == [1, 1, 1]  # --max-batch 1: per-request inference


def test_batcher_waits_at_most_max_wait():
    async def timed(announce: int) -> float:
        b = Batcher(lambda x: x.float().sum((1, 2)).unsqueeze(1), 64, 200)
        await b.start()
        for _ in range(announce):
            b.announce()
        loop = asyncio.get_running_loop()
        t = loop.time()
        await b.submit(torch.zeros(1, 28, 28, dtype=torch.uint8), announced=False)
        waited = loop.time() - t
        await b.stop()
        return waited

    assert asyncio.run(timed(0)) < 0.1  # alone: answered at once
    assert 0.15 < asyncio.run(timed(1)) < 1.0  # another request on its way: waits for it, 200 ms at most


def test_cli_errors_are_one_line(tmp_path):
    proc = run([sys.executable, "-m", "hwr_dist.cli", "serve", str(tmp_path / "missing.pt")], PYTHONPATH=str(ROOT))
    assert proc.returncode == 2 and "not found" in one_error_line(proc)
    # without the optional packages: one line saying what to install
    code = ("import sys; sys.modules['fastapi'] = None; sys.argv = ['hwr', 'serve', 'x.pt']; "
            "from hwr_dist.cli import main; main()")
    proc = run([sys.executable, "-c", code], PYTHONPATH=str(ROOT))
    assert proc.returncode == 2 and "pip install 'hwr-dist[serve]'" in one_error_line(proc)
