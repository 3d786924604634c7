"""The OpenAI-compatible HTTP API of the guard: `create_app(settings)` and `run_server`.

Layout (vLLM-like): `schemas` (protocol), `serving` and `scoring` (logic), `routes`
(thin routers), `deps` (services on ``app.state`` and Depends aliases), `errors`
(OpenAI-shaped errors), `app` (factory, middleware, lifespan), `server` (uvicorn, drain).
Nothing but the CLI imports this package.
"""
