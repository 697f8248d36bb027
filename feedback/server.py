"""`rlhf serve judge`: a small OpenAI-compatible chat-completions server backed by a local model.

    rlhf serve judge --model smollm2-135m-instruct --host 127.0.0.1 --port 8000

One team hosts one judge for many labelling workers (`type: http` judge configs point at
`http://HOST:PORT/v1`). Endpoints: `POST /v1/chat/completions` (messages, max_tokens,
temperature; greedy at temperature 0) and `GET /v1/models`. Requests are served one at a time
by the model; the HTTP layer is threaded so that clients queue instead of being refused.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeModel:
    def __init__(self, ref: str, trust_remote_code: bool = False):
        from pipeline.models import load_causal_lm, load_tokenizer, resolve

        path = resolve(ref)
        self.ref = ref
        self.tok = load_tokenizer(path, trust_remote_code)
        self.model = load_causal_lm(path, "fp32", trust_remote_code).eval()
        self.lock = threading.Lock()

    def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> tuple[str, int, int]:
        import torch

        from pipeline.generation import chat_ids, sampling_kwargs

        ids = torch.tensor([chat_ids(self.tok, messages)])
        with self.lock, torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                                      **sampling_kwargs(temperature))
        new = out[0, ids.shape[1]:]
        return self.tok.decode(new, skip_special_tokens=True), ids.shape[1], int(new.shape[0])


def make_handler(judge: JudgeModel, log=print):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": judge.ref, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = req["messages"]
                if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
                    raise ValueError("messages must be a list of {role, content}")
                max_tokens = int(req.get("max_tokens") or 16)
                temperature = float(req.get("temperature") or 0.0)
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": {"message": f"bad request: {exc}"}})
                return
            text, n_prompt, n_completion = judge.complete(messages, min(max_tokens, 512), temperature)
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": judge.ref,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion},
            })

        def log_message(self, fmt, *args):  # one line per request, no headers (they may hold keys)
            log(f"{self.address_string()} {fmt % args}")

    return Handler


def make_server(model_ref: str, host: str = "127.0.0.1", port: int = 8000, log=print) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(JudgeModel(model_ref), log))
    server.daemon_threads = True
    return server
