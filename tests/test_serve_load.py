"""A load check on `controlnet serve`: 20 concurrent API requests against the shipped model. Every one
either completes or is refused cleanly by the queue limit (503 with a one-line error), the server's
memory stays bounded, and it answers normally afterwards."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request

import pytest

from controlnet import shipped

from .helpers import serve_in_background

pytest.importorskip("gradio")
REQUESTS, MAX_QUEUE = 20, 4


def _post(url: str, body: dict) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    request = urllib.request.Request(f"{url}/api/generate", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_twenty_concurrent_requests_complete_or_are_refused_cleanly(tmp_path):
    example = shipped.examples()[0]
    image = base64.b64encode(example.control.read_bytes()).decode()
    with serve_in_background(tmp_path, "--max-queue", str(MAX_QUEUE)) as (url, process):
        body = {"prompt": example.prompt, "steps": 4, "seed": 1, "units": [{"image": image, "annotator": "none"}]}
        assert _post(url, body)[0] == 200  # warm: the model is loaded
        before = _rss_mib(process.pid)
        results: list[tuple[int, dict]] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            outcome = _post(url, {**body, "seed": i, "num_images": 2})
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        statuses = sorted(status for status, _ in results)
        assert len(results) == REQUESTS and set(statuses) <= {200, 503}, statuses
        done = [r for s, r in results if s == 200]
        refused = [r for s, r in results if s == 503]
        assert len(done) >= MAX_QUEUE and all(len(r["images"]) == 2 for r in done)
        assert all("the server is busy" in r["error"] and "\n" not in r["error"] for r in refused)
        after = _rss_mib(process.pid)
        assert after < before + 500, (before, after)  # bounded: no pile of queued work or leaked results
        status, result = _post(url, body)
        assert status == 200 and result["seeds"] == [1]  # and it goes on serving
        print(f"load: {len(done)} completed, {len(refused)} refused; RSS {before:.0f} -> {after:.0f} MiB")
