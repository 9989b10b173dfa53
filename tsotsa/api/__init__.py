"""The swarm over HTTP: an OpenAI-compatible API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`),
the live dashboard at `/` and Prometheus `/metrics`, on one ASGI app (FastAPI, served by uvicorn).

`tsotsa serve --coordinator HOST:PORT --port P` runs it as its own process; `tsotsa-coordinator up
--http-port P` runs it inside the coordinator. Modules: `errors` (OpenAI's error shape), `schema` (the
requests), `text` (stop sequences, incremental detokenizing), `engine` (requests → `SwarmModel.generate`
in worker threads), `openai_routes` (the `/v1` endpoints), `app` (auth, assembly), `server` (uvicorn, TLS).
"""
