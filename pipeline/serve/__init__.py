"""One OpenAI-compatible chat-completions server for judges and policies (FastAPI + uvicorn).

    rlhf serve judge --model smollm2-135m-instruct            # a judge for `type: http` judge configs
    rlhf serve policy runs/quickstart/sft --port 8001         # a trained policy artifact
    RLHF_SERVE_KEY=... rlhf serve judge --model tiny --host 0.0.0.0 --api-key-env RLHF_SERVE_KEY

Endpoints: `POST /v1/chat/completions` (and `/chat/completions`), `GET /v1/models` (and `/models`),
`GET /health`, and `POST /v1/feedback` (and `/feedback`; with `serve policy --monitor DB`). Any OpenAI client
works against `http://HOST:PORT/v1`; the `openai` package is what the tests use. Honoured request fields: model (ignored: one model is served), messages,
max_tokens / max_completion_tokens, temperature (0 = greedy), top_p, stream (+ stream_options
include_usage), logprobs, top_logprobs, seed, n (1 only), stop (refused unless empty); unknown
fields are ignored as OpenAI does.

The modules, each importing only those above it:
    options.py   ServeOptions (one field per `rlhf serve` option) and the checks before anything loads
    schema.py    the request models, OpenAI-shaped errors, escaping of client text for logs
    engine.py    the model, admission, the generation worker threads (Engine, Job)
    traffic.py   the traffic log's server side (--monitor): Recorder writes answers and feedback off the event loop
    guard.py     connection caps and head deadlines (uvicorn protocol), auth/Host/Origin checks, access log
    app.py       the FastAPI routes, reading and answering a request (JSON or server-sent events)
    launch.py    which model, the listening socket, uvicorn: serve_judge, serve_policy

This package imports nothing itself: import a name from the module that holds it (`rlhf` reads ServeOptions
without loading FastAPI or torch).
"""
