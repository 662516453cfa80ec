"""Serving a package: an OpenAI-compatible multimodal chat endpoint on Ray Serve.

`protocol.py` (the request schema, OpenAI-style errors, response and SSE chunk bodies),
`images.py` (`image_url` parts: `data:` URLs and http(s) fetches, with limits), `app.py` (the
Ray Serve deployment: one replica = one loaded `Runtime` + its `Scheduler` engine loop, behind a
FastAPI ingress; `build_app` is the `import_path` target of `serve run`), `cli.py`
(`python -m engines serve PACKAGE`).
"""
