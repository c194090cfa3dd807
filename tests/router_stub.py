"""A recording stub worker: an HTTP server on 127.0.0.1 that answers like an SGLang worker and logs
every request it receives (method, path, query, headers, body).

Put the real `sglang-router` in front of it to learn what the router sends to a worker: the
start-up probes, health checks, `/get_load` polls and the bodies of forwarded requests. The
recorded-request fixture (tests/fixtures/sglang_router_0.3.2.json) is made this way:

    python -m tests.router_stub --record tests/fixtures/sglang_router_0.3.2.json

Answers are minimal SGLang shapes (not a model): enough for the router to register the worker and
pass replies back to its client.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from radixlm.bench.launcher import RouterProcess

STUB_MODEL = "stub-model"
LOAD_TOKENS = 7  # what /get_load reports, so a router's /get_loads shows whether it parsed it


def _stub_reply(method: str, path: str) -> Optional[Any]:
    """The JSON (or "" for an empty 200) a worker answers on `path`; None = 404."""
    if path in ("/health", "/health_generate", "/flush_cache"):
        return ""
    if path in ("/server_info", "/get_server_info"):
        return {"model_path": STUB_MODEL, "tokenizer_path": STUB_MODEL, "served_model_name": STUB_MODEL,
                "tp_size": 1, "dp_size": 1, "version": "stub", "internal_states": [{}]}
    if path in ("/model_info", "/get_model_info"):
        return {"model_path": STUB_MODEL, "tokenizer_path": STUB_MODEL, "is_generation": True,
                "served_model_name": STUB_MODEL}
    if path == "/get_load":
        return [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": LOAD_TOKENS}]
    if path == "/v1/models":
        return {"object": "list", "data": [{"id": STUB_MODEL, "object": "model", "owned_by": "stub"}]}
    if path == "/generate":
        return {"text": " ok", "output_ids": [1], "meta_info": {
            "id": "stub", "prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0,
            "finish_reason": {"type": "length", "length": 1}, "e2e_latency": 0.0}}
    if path in ("/v1/chat/completions", "/v1/completions"):
        return {"id": "stub", "object": "chat.completion", "created": 0, "model": STUB_MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    return None


class RecordingStub:
    """`with RecordingStub() as stub:` serves on `stub.url`; `stub.requests` is the log."""

    def __init__(self, port: int = 0):
        self.requests: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                parts = urlsplit(self.path)
                with stub._lock:
                    stub.requests.append({"method": self.command, "path": parts.path, "query": parts.query,
                                          "headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body})
                reply = _stub_reply(self.command, parts.path)
                data = b"" if reply in ("", None) else json.dumps(reply).encode()
                self.send_response(404 if reply is None else 200)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "RecordingStub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self, method: str, path: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == method and r["path"] == path]


# ------------------------------------------------------------------------------ PD mode
def pd_args(prefill: List[tuple], decode: List[str]) -> List[str]:
    """The router's PD flags: `prefill` as (url, bootstrap port), `decode` urls."""
    out = ["--pd-disaggregation"]
    for url, bport in prefill:
        out += ["--prefill", url, str(bport)]
    for url in decode:
        out += ["--decode", url]
    return out


# ------------------------------------------------------------------------------ recording
VARYING_HEADERS = {"host": "127.0.0.1:<port>", "date": "<date>", "content-length": None,
                   "x-request-id": "<request-id>", "traceparent": "<traceparent>"}


def normalise(entry: Dict[str, Any]) -> Dict[str, Any]:
    """Replaces what varies from run to run (ports, ids, dates) with placeholders."""
    headers = {}
    for k, v in sorted(entry["headers"].items()):
        if k in VARYING_HEADERS:
            if VARYING_HEADERS[k] is not None:
                headers[k] = VARYING_HEADERS[k]
            continue
        headers[k] = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", v)
    return {**entry, "headers": headers}


# what a client sends to the router: (name, path, body); the fixture holds what the router forwarded
CLIENT_REQUESTS = [
    ("generate", "/generate", {"text": "The capital of France is",
                               "sampling_params": {"max_new_tokens": 8, "temperature": 0}}),
    ("generate_ids_stream", "/generate", {"input_ids": [5, 6, 7, 8], "stream": True,
                                          "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                              "ignore_eos": True}}),
    ("chat", "/v1/chat/completions", {"model": STUB_MODEL, "messages": [{"role": "user", "content": "Say hi"}],
                                      "max_tokens": 8, "temperature": 0}),
    ("chat_stream", "/v1/chat/completions", {"model": STUB_MODEL, "stream": True, "max_tokens": 8,
                                             "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Say hi"}]}),
    ("completion", "/v1/completions", {"model": STUB_MODEL, "prompt": "Once upon a time", "max_tokens": 8}),
]


def record(out_path: str) -> List[Dict[str, Any]]:
    """Runs the real router 0.3.2 in front of a stub; returns and writes the normalised log."""
    import requests
    import sglang_router.version as v

    with RecordingStub() as stub:
        with RouterProcess([stub.url], extra=["--health-check-interval-secs", "1"]) as router:
            time.sleep(2.5)  # a few periodic health checks
            requests.get(router.url + "/get_loads", timeout=10)  # the router asks each worker's /get_load
            names = {}
            for name, path, body in CLIENT_REQUESTS:
                n_before = len(stub.requests)
                r = requests.post(router.url + path, json=body, timeout=30)
                assert r.status_code == 200, (name, r.status_code, r.text)
                fwd = [i for i in range(n_before, len(stub.requests)) if stub.requests[i]["path"] == path]
                assert len(fwd) == 1, (name, fwd)
                names[fwd[0]] = name
        log = [normalise(e) for e in stub.requests]
    seen, uniq = set(), []
    for i, e in enumerate(log):  # one entry per distinct request (periodic probes repeat)
        key = json.dumps({k: e[k] for k in ("method", "path", "query", "body")}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            uniq.append({"name": names.get(i, "probe " + e["path"]), **e})
    doc = {"router": f"sglang-router {v.__version__}",
           "how": "python -m tests.router_stub --record " + out_path,
           "note": "what the router sent to one worker: start-up probes, periodic /health, /get_load (asked "
                   "through the router's /get_loads), and the forwarded client requests; 'client_requests' are "
                   "what the client sent to the router. Host ports normalised.",
           "client_requests": [{"name": n, "path": p, "body": b} for n, p, b in CLIENT_REQUESTS],
           "requests": uniq}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    return uniq


PD_BOOTSTRAP_PORT = 8998  # what the fixture's --prefill names (nothing listens there)


def record_pd(out_path: str) -> Dict[str, Any]:
    """Runs the real router in PD mode (`--pd-disaggregation --prefill URL 8998 --decode URL`) in
    front of two stubs; writes what each received (normalised, one entry per distinct request)."""
    import requests
    import sglang_router.version as v

    with RecordingStub() as p, RecordingStub() as d:
        with RouterProcess([], policy="round_robin", extra=[*pd_args([(p.url, PD_BOOTSTRAP_PORT)], [d.url]),
                                                              "--health-check-interval-secs", "1"]) as router:
            time.sleep(2.5)
            for name, path, body in CLIENT_REQUESTS:
                r = requests.post(router.url + path, json=body, timeout=30)
                assert r.status_code == 200, (name, r.status_code, r.text)
            requests.get(router.url + "/get_model_info", timeout=10)
        sides = {}
        for side, stub in (("prefill", p), ("decode", d)):
            seen, uniq = set(), []
            for e in map(normalise, stub.requests):
                if isinstance(e["body"], dict) and "bootstrap_room" in e["body"]:
                    e["body"]["bootstrap_room"] = "<room>"  # random per request
                key = json.dumps({k: e[k] for k in ("method", "path", "query", "body")}, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    name = next((n for n, pth, b in CLIENT_REQUESTS if pth == e["path"] and isinstance(e["body"], dict)
                                 and e["body"].get("stream", False) == b.get("stream", False)), "probe " + e["path"])
                    uniq.append({"name": name, **e})
            sides[side] = uniq
    doc = {"router": f"sglang-router {v.__version__}",
           "how": "python -m tests.router_stub --record-pd " + out_path,
           "router_args": pd_args([("http://127.0.0.1:<prefill-port>", PD_BOOTSTRAP_PORT)],
                                  ["http://127.0.0.1:<decode-port>"]),
           "note": "what the router sent to the prefill and the decode worker in PD mode: the same body to both, "
                   "with bootstrap_host (the prefill URL's host), bootstrap_port (the port after --prefill URL) and "
                   "bootstrap_room (random 63-bit, replaced by '<room>') added; it answers the client with the "
                   "decode worker's response. 'client_requests' are what the client sent to the router.",
           "client_requests": [{"name": n, "path": pth, "body": b} for n, pth, b in CLIENT_REQUESTS], **sides}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return doc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", metavar="OUT.json", help="record what the real router sends to a worker")
    ap.add_argument("--record-pd", metavar="OUT.json", help="record what the router sends in PD mode")
    ap.add_argument("--port", type=int, default=0, help="serve the stub (without --record) on this port")
    args = ap.parse_args(argv)
    if args.record_pd:
        doc = record_pd(args.record_pd)
        for side in ("prefill", "decode"):
            for e in doc[side]:
                print(side, e["method"], e["path"], json.dumps(e["body"])[:160])
        return
    if args.record:
        for e in record(args.record):
            print(e["method"], e["path"], json.dumps(e["body"])[:200])
        return
    with RecordingStub(args.port) as stub:
        print(f"stub on {stub.url}; Ctrl-C prints the log", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print(json.dumps(stub.requests, indent=1))


if __name__ == "__main__":
    main()
